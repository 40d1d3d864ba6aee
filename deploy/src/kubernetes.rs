//! The Kubernetes manifests of a quadrant node agent per node, built from `k8s-openapi`'s types:
//! Namespace, ServiceAccount, ClusterRole and its binding, the agent's ConfigMap, the DaemonSet
//! (host network and PID namespace, the host paths it works in, the capabilities it needs, an
//! init container that installs `quadrant-cni`, node-critical priority, probes on the agent's
//! health endpoints), a headless metrics Service, and a kustomization listing them.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet},
        core::v1::{
            Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar,
            EnvVarSource, HTTPGetAction, HostPathVolumeSource, Namespace, ObjectFieldSelector,
            PodSpec, PodTemplateSpec, Probe, SecretVolumeSource, SecurityContext, Service,
            ServiceAccount, ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
        },
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use serde::Serialize;

/// What the manifests are made for.
#[derive(Clone, Debug)]
pub struct Options {
    /// The namespace.
    pub namespace: String,
    /// The image holding `/usr/local/bin/quadrant` and `/usr/local/bin/quadrant-cni`.
    pub image: String,
    /// The agent's configuration (YAML), as the ConfigMap carries it.
    pub config: String,
    /// The port of the agent's metrics and health endpoints.
    pub metrics_port: u16,
    /// With the nodes as each other's peers: the Secret holding the upstream CA.
    pub upstream_secret: Option<String>,
}

/// The application name every object carries.
pub const APP: &str = "quadrant";

fn labels() -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name".to_owned(), APP.to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            "node-agent".to_owned(),
        ),
    ]
    .into()
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: Some(labels()),
        ..ObjectMeta::default()
    }
}

/// A kustomization (not a Kubernetes API object: kustomize's own file).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Kustomization {
    /// `kustomize.config.k8s.io/v1beta1`.
    pub api_version: String,
    /// `Kustomization`.
    pub kind: String,
    /// The namespace of every namespaced object.
    pub namespace: String,
    /// The files, in apply order.
    pub resources: Vec<String>,
}

/// One file of the render: its name and its YAML.
pub type File = (String, String);

fn yaml<T: Serialize>(name: &str, value: &T) -> anyhow::Result<File> {
    Ok((name.to_owned(), serde_yaml::to_string(value)?))
}

/// Every manifest, in apply order, the kustomization last.
pub fn render(o: &Options) -> anyhow::Result<Vec<File>> {
    let ns = o.namespace.as_str();
    let files = vec![
        yaml("namespace.yaml", &namespace(ns))?,
        yaml("serviceaccount.yaml", &service_account(ns))?,
        yaml("clusterrole.yaml", &cluster_role())?,
        yaml("clusterrolebinding.yaml", &cluster_role_binding(ns))?,
        yaml("configmap.yaml", &config_map(ns, &o.config))?,
        yaml("daemonset.yaml", &daemon_set(o))?,
        yaml("service.yaml", &service(ns, o.metrics_port))?,
    ];
    let kustomization = Kustomization {
        api_version: "kustomize.config.k8s.io/v1beta1".into(),
        kind: "Kustomization".into(),
        namespace: ns.to_owned(),
        resources: files.iter().map(|(n, _)| n.clone()).collect(),
    };
    let mut files = files;
    files.push(yaml("kustomization.yaml", &kustomization)?);
    Ok(files)
}

fn namespace(ns: &str) -> Namespace {
    let mut m = meta(ns, None);
    // The agent loads eBPF programs and needs host access: the namespace runs privileged pods
    // (Pod Security Admission).
    m.labels.get_or_insert_default().insert(
        "pod-security.kubernetes.io/enforce".into(),
        "privileged".into(),
    );
    Namespace {
        metadata: m,
        ..Namespace::default()
    }
}

fn service_account(ns: &str) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(APP, Some(ns)),
        ..ServiceAccount::default()
    }
}

/// What the agent does with the API (`peers.kubernetes`): reads and watches the nodes (the
/// other agents' addresses) and patches its own Node object's annotations (its address and
/// prefixes); lists and watches the `EndpointSlice`s of the Services that services with a VIP
/// name (`services[].kubernetes_service`). Nothing else.
fn cluster_role() -> ClusterRole {
    ClusterRole {
        metadata: meta(APP, None),
        rules: Some(vec![
            PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["nodes".to_owned()]),
                verbs: ["get", "list", "watch", "patch"]
                    .map(str::to_owned)
                    .to_vec(),
                ..PolicyRule::default()
            },
            PolicyRule {
                api_groups: Some(vec!["discovery.k8s.io".to_owned()]),
                resources: Some(vec!["endpointslices".to_owned()]),
                verbs: ["list", "watch"].map(str::to_owned).to_vec(),
                ..PolicyRule::default()
            },
        ]),
        ..ClusterRole::default()
    }
}

fn cluster_role_binding(ns: &str) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: meta(APP, None),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: APP.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: APP.into(),
            namespace: Some(ns.to_owned()),
            ..Subject::default()
        }]),
    }
}

fn config_map(ns: &str, config: &str) -> ConfigMap {
    ConfigMap {
        metadata: meta(APP, Some(ns)),
        data: Some([("config.yaml".to_owned(), config.to_owned())].into()),
        ..ConfigMap::default()
    }
}

/// Host paths the agent works in: (volume, host path, mount path, bidirectional propagation).
const HOST_PATHS: [(&str, &str, &str, bool); 7] = [
    // Pins (it mounts bpffs here if the host has not).
    ("bpffs", "/sys/fs/bpf", "/sys/fs/bpf", true),
    // Control socket, state, its cgroup2 mount (outside /sys).
    ("run", "/run/quadrant", "/run/quadrant", true),
    // Network namespaces of the quadrants (`ip netns`).
    ("netns", "/run/netns", "/run/netns", true),
    // CA keys, audit log, content-addressed artifacts.
    ("state", "/var/lib/quadrant", "/var/lib/quadrant", false),
    // The node's CNI configuration (`cni.install`).
    ("cni-conf", "/etc/cni/net.d", "/etc/cni/net.d", false),
    // Where the init container puts quadrant-cni.
    ("cni-bin", "/opt/cni/bin", "/host/opt/cni/bin", false),
    // The trust store of plan and policy signers.
    ("trust", "/etc/quadrant/trust", "/etc/quadrant/trust", false),
];

/// What the agent does as root without being fully privileged: load and attach eBPF programs
/// (`BPF`, `PERFMON`, `NET_ADMIN`), mount bpffs and cgroup2 and enter namespaces
/// (`SYS_ADMIN`), see other processes' namespaces and cgroups (`SYS_PTRACE`), lock map memory
/// (`SYS_RESOURCE`), stop workloads (`KILL`).
const CAPABILITIES: [&str; 7] = [
    "BPF",
    "PERFMON",
    "NET_ADMIN",
    "SYS_ADMIN",
    "SYS_PTRACE",
    "SYS_RESOURCE",
    "KILL",
];

/// The host paths, the configuration and (with peers) the upstream CA's Secret, as volumes;
/// the agent's mounts of them.
fn volumes(upstream_secret: Option<&str>) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes: Vec<Volume> = HOST_PATHS
        .iter()
        .map(|(name, host, _, _)| Volume {
            name: (*name).into(),
            host_path: Some(HostPathVolumeSource {
                path: (*host).into(),
                type_: Some("DirectoryOrCreate".into()),
            }),
            ..Volume::default()
        })
        .collect();
    volumes.push(Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: APP.into(),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    });
    let mut mounts: Vec<VolumeMount> = HOST_PATHS
        .iter()
        .filter(|(name, ..)| *name != "cni-bin")
        .map(|(name, _, at, bidirectional)| VolumeMount {
            name: (*name).into(),
            mount_path: (*at).into(),
            mount_propagation: bidirectional.then(|| "Bidirectional".to_owned()),
            ..VolumeMount::default()
        })
        .collect();
    mounts.push(VolumeMount {
        name: "config".into(),
        mount_path: "/etc/quadrant/config".into(),
        read_only: Some(true),
        ..VolumeMount::default()
    });
    if let Some(secret) = upstream_secret {
        volumes.push(Volume {
            name: "upstream".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.to_owned()),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "upstream".into(),
            mount_path: crate::UPSTREAM_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    (volumes, mounts)
}

/// The agent's container: `quadrant up` with the ConfigMap's configuration, its probes on the
/// health endpoints (on loopback: the pod is in the host's network), its capabilities.
fn agent_container(o: &Options, mounts: Vec<VolumeMount>) -> Container {
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(o.metrics_port)),
            host: Some("127.0.0.1".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    Container {
        name: "agent".into(),
        image: Some(o.image.clone()),
        command: Some(
            [
                "/usr/local/bin/quadrant",
                "--config",
                "/etc/quadrant/config/config.yaml",
                "up",
            ]
            .map(str::to_owned)
            .to_vec(),
        ),
        // Its node's name: the name it has among its peers and the Node object it annotates.
        env: Some(vec![EnvVar {
            name: "NODE_NAME".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "spec.nodeName".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        ports: Some(
            std::iter::once(("metrics", o.metrics_port))
                .chain(
                    o.upstream_secret
                        .is_some()
                        .then_some(("peers", crate::PEER_PORT)),
                )
                .map(|(name, port)| ContainerPort {
                    name: Some(name.into()),
                    container_port: i32::from(port),
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                })
                .collect(),
        ),
        liveness_probe: Some(probe("/healthz", 10)),
        readiness_probe: Some(probe("/readyz", 5)),
        security_context: Some(SecurityContext {
            // Privileged only because the mounts the agent makes (bpffs, its cgroup2, the
            // quadrants' network namespaces) must reach the host — pins outlive the pod — and
            // Kubernetes allows Bidirectional propagation only to privileged containers. The
            // capabilities below are what it uses.
            privileged: Some(true),
            run_as_user: Some(0),
            capabilities: Some(Capabilities {
                add: Some(CAPABILITIES.map(str::to_owned).to_vec()),
                drop: Some(vec!["ALL".into()]),
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    }
}

/// The init container that puts `quadrant-cni` where the runtime finds plugins.
fn install_cni_container(o: &Options) -> Container {
    Container {
        name: "install-cni".into(),
        image: Some(o.image.clone()),
        command: Some(
            [
                "cp",
                "/usr/local/bin/quadrant-cni",
                "/host/opt/cni/bin/quadrant-cni",
            ]
            .map(str::to_owned)
            .to_vec(),
        ),
        volume_mounts: Some(vec![VolumeMount {
            name: "cni-bin".into(),
            mount_path: "/host/opt/cni/bin".into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

fn daemon_set(o: &Options) -> DaemonSet {
    let selector = BTreeMap::from([("app.kubernetes.io/name".to_owned(), APP.to_owned())]);
    let (volumes, mounts) = volumes(o.upstream_secret.as_deref());
    let agent = agent_container(o, mounts);
    let install_cni = install_cni_container(o);
    DaemonSet {
        metadata: meta(APP, Some(&o.namespace)),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::Int(1)),
                    ..RollingUpdateDaemonSet::default()
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(APP.into()),
                    host_network: Some(true),
                    host_pid: Some(true),
                    dns_policy: Some("ClusterFirstWithHostNet".into()),
                    priority_class_name: Some("system-node-critical".into()),
                    // `down` (SIGTERM) hands the dataplane over only with --keep-dataplane;
                    // a pod deletion removes the quadrants, so give it time.
                    termination_grace_period_seconds: Some(30),
                    tolerations: Some(vec![Toleration {
                        operator: Some("Exists".into()),
                        ..Toleration::default()
                    }]),
                    init_containers: Some(vec![install_cni]),
                    containers: vec![agent],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        }),
        ..DaemonSet::default()
    }
}

fn service(ns: &str, port: u16) -> Service {
    Service {
        metadata: meta("quadrant-metrics", Some(ns)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_owned(),
                APP.to_owned(),
            )])),
            ports: Some(vec![ServicePort {
                name: Some("metrics".into()),
                port: i32::from(port),
                target_port: Some(IntOrString::Int(i32::from(port))),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}
