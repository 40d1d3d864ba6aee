//! The CNI protocol of `quadrant-cni`: environment, stdin, results and errors. The spec's types
//! (network configuration, result, command, error codes) are `rscni-types`'; the dispatch is
//! here because `rscni-plugin`'s runner prints results without their `cniVersion` (libcni then
//! reads them as version 0.1.0), emits no error JSON, and refuses a DEL without `CNI_NETNS`,
//! which the spec lets a runtime omit.

use std::{
    io::{Read as _, Write as _},
    process::ExitCode,
};

use rscni_types::{
    error::Error,
    types::{Cmd, NetConf},
};
use serde_json::{Value, json};

use super::{Failure, PluginConf, SUPPORTED_VERSIONS};
use crate::{
    control::{Client, ClientError},
    pods::{Attachment, PodSpec},
};

impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Config(m) => Self::InvalidNetworkConfig(m),
            Failure::NoContainer(m) => Self::NotExist(m),
            Failure::Later(m) => Self::TryAgainLater(m),
            Failure::Unavailable(m) => Self::PluginNotAvailable(m),
            Failure::Refused(m) => Self::Custom(100, "the quadrant agent refused".into(), m),
            Failure::Io(m) => Self::IOFailure(m),
        }
    }
}

/// Runs one CNI command from the environment and stdin; the exit code says how it went.
#[must_use]
pub fn main() -> ExitCode {
    let mut stdin = String::new();
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let outcome = if command.is_empty() {
        println!(
            "quadrant-cni: a CNI plugin chained after a primary plugin; CNI spec {}",
            SUPPORTED_VERSIONS.join(", ")
        );
        return ExitCode::SUCCESS;
    } else if let Err(e) = std::io::stdin().read_to_string(&mut stdin) {
        Err(Error::IOFailure(format!(
            "cannot read the configuration: {e}"
        )))
    } else {
        run(&command, &stdin, |k| std::env::var(k).ok())
    };
    let version = serde_json::from_str::<Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].to_owned());
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(result)) => {
            let _ = writeln!(out, "{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(out, "{}", error_json(&version, &e));
            ExitCode::FAILURE
        }
    }
}

/// The spec's error object.
#[must_use]
pub fn error_json(version: &str, e: &Error) -> Value {
    let msg = match e {
        Error::Custom(_, msg, _) => msg.clone(),
        other => other.to_string(),
    };
    json!({
        "cniVersion": version,
        "code": u32::from(e),
        "msg": msg,
        "details": e.details(),
    })
}

/// One command: `env` reads the `CNI_*` variables. Returns what to print on success.
pub fn run(
    command: &str,
    stdin: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Value>, Error> {
    let cmd: Cmd = command
        .parse()
        .map_err(|_| Error::InvalidEnvValue(format!("unknown CNI_COMMAND {command:?}")))?;
    if cmd == Cmd::Version {
        return Ok(Some(json!({
            "cniVersion": SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1],
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    // The configuration as the runtime sent it: the previous result is passed on with every
    // field kept, and GC's attachments are read from it (`rscni-types` names their container
    // id `container_id`; the spec and libcni write `containerID`).
    let mut raw: Value = serde_json::from_str(stdin)
        .map_err(|e| Error::FailedToDecode(format!("the network configuration: {e}")))?;
    let valid = raw
        .as_object_mut()
        .and_then(|o| o.remove("cni.dev/valid-attachments"));
    let conf: NetConf = serde_json::from_value(raw.clone())
        .map_err(|e| Error::FailedToDecode(format!("the network configuration: {e}")))?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(Error::IncompatibleVersion(format!(
            "cniVersion {} is not one of {}",
            conf.cni_version,
            SUPPORTED_VERSIONS.join(", ")
        )));
    }
    let plugin = PluginConf::from_custom(&conf.custom)?;
    let client = Client::new(&plugin.socket);
    let required = |k: &str| {
        env(k)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Error::InvalidEnvValue(format!("{k} is required for {command}")))
    };
    match cmd {
        Cmd::Add => add(
            &conf,
            &raw,
            &plugin,
            &client,
            &Attachment {
                container_id: required("CNI_CONTAINERID")?,
                ifname: required("CNI_IFNAME")?,
            },
            &env("CNI_NETNS").unwrap_or_default(),
            super::pod_name(&env("CNI_ARGS").unwrap_or_default()),
        ),
        Cmd::Del => {
            let a = Attachment {
                container_id: required("CNI_CONTAINERID")?,
                ifname: required("CNI_IFNAME")?,
            };
            del(&plugin, &client, &a).map(|()| None)
        }
        Cmd::Check => {
            prev_result(&conf, &raw)?;
            let c = required("CNI_CONTAINERID")?;
            let i = required("CNI_IFNAME")?;
            client
                .pod_check(&c, &i)
                .map_err(|e| agent_error(&plugin, &e))?;
            Ok(None)
        }
        Cmd::Status => {
            if client.agent_running() {
                Ok(None)
            } else {
                Err(Failure::Unavailable(format!(
                    "the quadrant agent is not running (no answer on {})",
                    plugin.socket.display()
                ))
                .into())
            }
        }
        Cmd::Gc => {
            let valid: Vec<Attachment> = valid
                .as_ref()
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|a| {
                    let field = |k: &str| a[k].as_str().map(str::to_owned);
                    match (field("containerID"), field("ifname")) {
                        (Some(container_id), Some(ifname)) => Ok(Attachment {
                            container_id,
                            ifname,
                        }),
                        _ => Err(Error::InvalidNetworkConfig(format!(
                            "cni.dev/valid-attachments: {a} needs containerID and ifname"
                        ))),
                    }
                })
                .collect::<Result<_, _>>()?;
            client
                .pod_gc(valid)
                .map(|_| None)
                .map_err(|e| agent_error(&plugin, &e))
        }
        other => Err(Error::InvalidEnvValue(format!(
            "unsupported CNI_COMMAND {}",
            <&str>::from(other)
        ))),
    }
}

/// The previous result, which a chained plugin needs, as the runtime sent it.
fn prev_result(conf: &NetConf, raw: &Value) -> Result<Value, Error> {
    match (&conf.prev_result, raw.get("prevResult")) {
        (Some(_), Some(prev)) if prev.is_object() => Ok(prev.clone()),
        _ => Err(Error::InvalidNetworkConfig(
            "quadrant-cni is a chained plugin: it needs prevResult (list it after a primary \
             plugin such as bridge or ptp)"
                .into(),
        )),
    }
}

fn agent_error(plugin: &PluginConf, e: &ClientError) -> Error {
    match e {
        ClientError::NotRunning { .. } => Failure::Later(format!(
            "the quadrant agent is not running (no answer on {}): {e}",
            plugin.socket.display()
        ))
        .into(),
        ClientError::Agent(message) => Failure::Refused(message.clone()).into(),
        other => Failure::Io(other.to_string()).into(),
    }
}

fn add(
    conf: &NetConf,
    raw: &Value,
    plugin: &PluginConf,
    client: &Client,
    a: &Attachment,
    netns: &str,
    pod: Option<String>,
) -> Result<Option<Value>, Error> {
    let (container_id, ifname) = (a.container_id.as_str(), a.ifname.as_str());
    let mut prev = prev_result(conf, raw)?;
    let quadrant = super::quadrant_of(raw.get("runtimeConfig"), plugin)?;
    let addresses = super::pod_ipv4_addresses(&prev, ifname)?;
    let peer = super::peer_ifindex(netns, ifname)?;
    let host_ifname = super::host_ifname(peer)?;
    client
        .pod_add(PodSpec {
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
            netns: netns.to_owned(),
            host_ifname,
            host_ifindex: peer,
            quadrant,
            addresses,
            pod,
            cgroup: raw
                .pointer("/runtimeConfig/cgroupPath")
                .and_then(Value::as_str)
                .filter(|p| !p.is_empty())
                .map(str::to_owned),
        })
        .map_err(|e| agent_error(plugin, &e))?;
    // The previous result unchanged, in the configuration's version.
    if let Some(o) = prev.as_object_mut() {
        o.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    }
    Ok(Some(prev))
}

/// DEL: idempotent; with no agent running it is queued for the agent's return and succeeds.
fn del(plugin: &PluginConf, client: &Client, a: &Attachment) -> Result<(), Error> {
    match client.pod_del(&a.container_id, &a.ifname) {
        Ok(_) => Ok(()),
        Err(ClientError::NotRunning { .. }) => {
            crate::pods::queue_del(&plugin.socket, a).map_err(|e| {
                Failure::Io(format!(
                    "no agent answers on {}, and the DEL cannot be queued for it: {e}",
                    plugin.socket.display()
                ))
                .into()
            })
        }
        Err(e) => Err(agent_error(plugin, &e)),
    }
}
