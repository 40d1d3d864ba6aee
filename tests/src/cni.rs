//! A container runtime's side of CNI, as libcni does it, for tests without a runtime: a
//! conflist's plugins run in order for ADD and CHECK and in reverse for DEL, each with the
//! `CNI_*` variables, its configuration on stdin (the list's `cniVersion` and `name`, the
//! previous plugin's result as `prevResult`, and under `runtimeConfig` the runtime's values of
//! the capabilities the plugin lists), the ADD result cached for DEL and CHECK.

use std::{
    collections::HashMap,
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::{
    bounded::output_within,
    harness::{Instance, sibling_binary},
};

/// Where Debian's `containernetworking-plugins` puts the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// A plugin's failure: its exit status and the error object it printed.
#[derive(Debug, Clone)]
pub struct PluginError {
    /// The plugin's `type`.
    pub plugin: String,
    /// Its error object (`code`, `msg`, `details`), or what it printed when that is no JSON.
    pub error: Value,
}

impl PluginError {
    /// The spec's error code.
    #[must_use]
    pub fn code(&self) -> u64 {
        self.error["code"].as_u64().unwrap_or(0)
    }

    /// `msg` and `details`.
    #[must_use]
    pub fn text(&self) -> String {
        format!("{} {}", self.error["msg"], self.error["details"])
    }
}

/// A runtime: where plugins are, and the cached ADD results.
#[derive(Debug)]
pub struct Runtime {
    /// `CNI_PATH`.
    pub path: Vec<PathBuf>,
    cache: HashMap<(String, String), Value>,
}

/// One attachment.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The runtime's values of capabilities (e.g. `io.kubernetes.cri.pod-annotations`).
    pub runtime_config: Value,
    /// `CNI_ARGS` (kubelet's runtimes pass `K8S_POD_NAMESPACE` and `K8S_POD_NAME`).
    pub args: String,
}

impl Runtime {
    /// Plugins from `path`, in order.
    #[must_use]
    pub fn new(path: Vec<PathBuf>) -> Self {
        Self {
            path,
            cache: HashMap::new(),
        }
    }

    fn exec(
        &self,
        command: &str,
        plugin: &Value,
        list: &Value,
        a: Option<&Attachment>,
        prev: Option<&Value>,
    ) -> Result<Value, PluginError> {
        let kind = plugin["type"].as_str().unwrap_or_default().to_owned();
        let mut conf = plugin.clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        if let (Some(a), Some(caps)) = (a, plugin["capabilities"].as_object()) {
            let mut rc = serde_json::Map::new();
            for (cap, on) in caps {
                if on == &Value::Bool(true)
                    && let Some(v) = a.runtime_config.get(cap)
                {
                    rc.insert(cap.clone(), v.clone());
                }
            }
            if !rc.is_empty() {
                conf["runtimeConfig"] = Value::Object(rc);
            }
        }
        if command == "GC" {
            conf["cni.dev/valid-attachments"] = list["cni.dev/valid-attachments"].clone();
        }
        let binary = self
            .path
            .iter()
            .map(|d| d.join(&kind))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("plugin {kind} not in {:?}", self.path));
        let path = std::env::join_paths(&self.path).expect("CNI_PATH");
        let mut cmd = Command::new(binary);
        cmd.env("CNI_COMMAND", command)
            .env("CNI_PATH", path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(a) = a {
            cmd.env("CNI_CONTAINERID", &a.container_id)
                .env("CNI_NETNS", &a.netns)
                .env("CNI_IFNAME", &a.ifname)
                .env("CNI_ARGS", &a.args);
        }
        let mut child = cmd.spawn().expect("plugin");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .expect("configuration");
        let out =
            crate::bounded::wait_output_within(child, crate::bounded::COMMAND_TIMEOUT, &kind, &[]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let parsed = serde_json::from_str::<Value>(&stdout);
        if out.status.success() {
            Ok(parsed.unwrap_or(Value::Null))
        } else {
            Err(PluginError {
                plugin: kind,
                error: parsed.unwrap_or_else(
                    |_| json!({"msg": stdout, "details": String::from_utf8_lossy(&out.stderr)}),
                ),
            })
        }
    }

    /// ADD through every plugin of `list`; the last result.
    pub fn add(&mut self, list: &Value, a: &Attachment) -> Result<Value, PluginError> {
        let mut prev: Option<Value> = None;
        for p in list["plugins"].as_array().expect("plugins") {
            prev = Some(self.exec("ADD", p, list, Some(a), prev.as_ref())?);
        }
        let result = prev.unwrap_or(Value::Null);
        self.cache
            .insert((a.container_id.clone(), a.ifname.clone()), result.clone());
        Ok(result)
    }

    /// CHECK through every plugin, each with the cached result.
    pub fn check(&self, list: &Value, a: &Attachment) -> Result<(), PluginError> {
        let cached = self.cache.get(&(a.container_id.clone(), a.ifname.clone()));
        for p in list["plugins"].as_array().expect("plugins") {
            self.exec("CHECK", p, list, Some(a), cached)?;
        }
        Ok(())
    }

    /// DEL through every plugin in reverse, each with the cached result; the cache entry goes.
    pub fn del(&mut self, list: &Value, a: &Attachment) -> Result<(), PluginError> {
        let key = (a.container_id.clone(), a.ifname.clone());
        let cached = self.cache.get(&key).cloned();
        for p in list["plugins"].as_array().expect("plugins").iter().rev() {
            self.exec("DEL", p, list, Some(a), cached.as_ref())?;
        }
        self.cache.remove(&key);
        Ok(())
    }

    /// STATUS of one plugin of `list`.
    pub fn status(&self, list: &Value, plugin: usize) -> Result<(), PluginError> {
        self.exec("STATUS", &list["plugins"][plugin], list, None, None)
            .map(|_| ())
    }

    /// VERSION of one plugin.
    ///
    /// # Panics
    /// If the plugin fails.
    #[must_use]
    pub fn version(&self, list: &Value, plugin: usize) -> Value {
        self.exec("VERSION", &list["plugins"][plugin], list, None, None)
            .expect("VERSION")
    }

    /// GC of one plugin with `valid` attachments.
    pub fn gc(
        &self,
        list: &Value,
        plugin: usize,
        valid: &[(&str, &str)],
    ) -> Result<(), PluginError> {
        let mut list = list.clone();
        list["cni.dev/valid-attachments"] = valid
            .iter()
            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
            .collect();
        let p = list["plugins"][plugin].clone();
        self.exec("GC", &p, &list, None, None).map(|_| ())
    }
}

/// Runs `argv` inside network namespace `netns` (by name), bounded.
#[must_use]
pub fn in_netns(netns: &str, argv: &[&str]) -> std::process::Output {
    output_within(
        Command::new("ip").args(["netns", "exec", netns]).args(argv),
        crate::bounded::COMMAND_TIMEOUT,
        &[],
    )
}

// Pods of the test: namespaces attached through a conflist of `ptp`, `host-local` and
// `quadrant-cni`.

/// A runtime with the reference plugins and this build's `quadrant-cni` (found beside
/// `qprobe`).
///
/// # Panics
/// When the reference plugins are not installed.
#[must_use]
pub fn pods_runtime(qprobe: &str) -> Runtime {
    let ours = sibling_binary(qprobe, "quadrant-cni");
    assert!(
        std::path::Path::new(REFERENCE_PLUGINS).join("ptp").exists(),
        "the reference plugins are missing: `cargo xtask setup` installs containernetworking-plugins"
    );
    Runtime::new(vec![
        PathBuf::from(REFERENCE_PLUGINS),
        ours.parent().expect("target dir").to_path_buf(),
    ])
}

/// The slot's pod subnet: 10.243.<slot>.0/24 (the slot's number from its instance name).
#[must_use]
pub fn subnet(inst: &Instance) -> String {
    let n: u8 = inst
        .config
        .instance
        .trim_start_matches("qt")
        .parse()
        .expect("slot");
    format!("10.243.{n}.0/24")
}

/// The conflist of the slot's pods; host-local starts without the addresses an earlier test
/// of the slot took.
#[must_use]
pub fn conflist(inst: &Instance, default_quadrant: Option<&str>) -> Value {
    let _ = std::fs::remove_dir_all(ipam_dir(inst));
    let mut ours = json!({
        "type": "quadrant-cni",
        "socket": inst.config.socket_path(),
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
    });
    if let Some(q) = default_quadrant {
        ours["quadrant"] = json!(q);
    }
    json!({
        "cniVersion": "1.0.0",
        "name": format!("{}-pods", inst.config.instance),
        "plugins": [
            {
                "type": "ptp",
                "ipam": {
                    "type": "host-local",
                    "subnet": subnet(inst),
                    "dataDir": ipam_dir(inst),
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            ours,
        ],
    })
}

#[must_use]
pub fn ipam_dir(inst: &Instance) -> String {
    format!("/run/quadrant-test/{}-ipam", inst.config.instance)
}

/// A pod: a network namespace of the test, named after the instance.
#[derive(Debug)]
pub struct Pod {
    /// Its namespace's name.
    pub netns: String,
}

impl Pod {
    /// Namespace `<instance>-<name>`, made anew.
    ///
    /// # Panics
    /// When it cannot be made.
    #[must_use]
    pub fn new(inst: &Instance, name: &str) -> Self {
        let netns = format!("{}-{name}", inst.config.instance);
        let _ = Command::new("ip")
            .args(["netns", "del", &netns])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &netns])
            .status()
            .expect("ip netns add");
        assert!(ok.success());
        Self { netns }
    }

    /// Its attachment, with `quadrant` as its annotation.
    #[must_use]
    pub fn attachment(&self, quadrant: Option<&str>) -> Attachment {
        Attachment {
            container_id: format!("c-{}", self.netns),
            netns: format!("/var/run/netns/{}", self.netns),
            ifname: "eth0".into(),
            runtime_config: quadrant.map_or(
                json!({}),
                |q| json!({"io.kubernetes.cri.pod-annotations": {"quadrant.io/quadrant": q}}),
            ),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={}",
                self.netns
            ),
        }
    }

    /// Whether a TCP connection from the pod to `to` is answered within 500 ms.
    #[must_use]
    pub fn connect(&self, qprobe: &str, to: &str) -> bool {
        let out = in_netns(&self.netns, &[qprobe, "tcp-connect", to, "500"]);
        String::from_utf8_lossy(&out.stdout).starts_with("ok")
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}
