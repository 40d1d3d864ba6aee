//! Watches `policy_dir` (inotify, through `notify`) and asks the agent to reload the policy when
//! a file in it is created, changed or removed. Events are debounced, so an editor's save or a
//! `cp -r` of a whole bundle causes one reload; a reload that fails keeps the live policy, and
//! the next change tries again.

use std::{
    path::Path,
    sync::mpsc,
    time::{Duration, Instant},
};

use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc::Sender;
use tracing::warn;

/// Quiet time after the last change before the reload.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Starts watching `dir`; each burst of changes sends one `()` on `reload`. The watch lasts as
/// long as the returned watcher.
pub fn watch(dir: &Path, reload: Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    let (tx, rx) = mpsc::channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(tx)?;
    watcher.watch(dir, RecursiveMode::Recursive)?;
    std::thread::Builder::new()
        .name("policy-watch".into())
        .spawn(move || {
            while let Ok(event) = rx.recv() {
                match event {
                    Ok(e) if is_change(e.kind) => {}
                    Ok(_) => continue,
                    Err(e) => {
                        warn!(error = %e, "policy_dir watch error");
                        continue;
                    }
                }
                let mut quiet_until = Instant::now() + DEBOUNCE;
                while let Ok(more) =
                    rx.recv_timeout(quiet_until.saturating_duration_since(Instant::now()))
                {
                    if more.is_ok_and(|e| is_change(e.kind)) {
                        quiet_until = Instant::now() + DEBOUNCE;
                    }
                }
                if reload.blocking_send(()).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| notify::Error::generic(&e.to_string()))?;
    Ok(watcher)
}

fn is_change(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
    )
}
