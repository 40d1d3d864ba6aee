//! A Kubernetes API server for the resources the agent follows — `/api/v1/nodes` (get, merge
//! patch) and `/apis/discovery.k8s.io/v1/namespaces/NS/endpointslices`: list (with a
//! `labelSelector` of one `key=value`), watch (newline-delimited watch events from a resource version, synthetic `ADDED`s for
//! a watch without one, ended after `timeoutSeconds`), whole objects or their metadata alone
//! (`PartialObjectMetadata`, as the `Accept` header asks), JSON merge patch, bearer-token
//! authentication and `Status` errors, as the API server answers them. No API server can be
//! installed on the test machines (none is packaged for Debian, on `PyPI` or npm), so the agent's
//! client (kube-rs) is run against this one; what it cannot show is listed in
//! `ARCHITECTURE.md`.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

type Body = BoxBody<Bytes, Infallible>;

/// The nodes' collection.
const NODES: &str = "nodes";

/// The collection of `namespace`'s endpoint slices.
fn slices_of(namespace: &str) -> String {
    format!("endpointslices/{namespace}")
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// Objects by (collection, name).
    objects: BTreeMap<(String, String), Value>,
    /// Every change: (resource version, type, collection, object).
    events: Vec<(u64, &'static str, String, Value)>,
    /// `METHOD path?query` of every request.
    requests: Vec<String>,
}

struct State {
    inner: Mutex<Inner>,
    changed: tokio::sync::watch::Sender<u64>,
    token: String,
}

impl State {
    fn locked(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `object` of `collection` (its resource version set) and records the event.
    fn put(&self, collection: &str, kind: &'static str, mut object: Value) -> Value {
        let mut i = self.locked();
        i.rv += 1;
        let rv = i.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let key = (collection.to_owned(), name);
        if kind == "DELETED" {
            i.objects.remove(&key);
        } else {
            i.objects.insert(key, object.clone());
        }
        i.events
            .push((rv, kind, collection.to_owned(), object.clone()));
        drop(i);
        self.changed.send_replace(rv);
        object
    }
}

/// The server, on a thread of its own until dropped.
pub struct KubeApi {
    /// Where it listens.
    pub addr: SocketAddr,
    /// With TLS: the PEM certificate of the CA that signed its certificate (a service account's
    /// `ca.crt`).
    pub ca_pem: Option<String>,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KubeApi {
    /// Listens on `listen` (port 0: any), accepting requests that carry `token`, over HTTP.
    ///
    /// # Panics
    /// When it cannot listen.
    #[must_use]
    pub fn start(listen: SocketAddr, token: &str) -> Self {
        Self::start_with(listen, token, None)
    }

    /// As [`KubeApi::start`], over TLS with a certificate for the listening address and
    /// `kubernetes.default.svc`, from a CA of its own ([`KubeApi::ca_pem`]), as an API server
    /// reached in-cluster is.
    ///
    /// # Panics
    /// When it cannot listen or make its certificates.
    #[must_use]
    pub fn start_tls(listen: SocketAddr, token: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("CA");
        let key = KeyPair::generate().expect("key");
        let mut leaf =
            CertificateParams::new(vec!["kubernetes.default.svc".to_owned()]).expect("params");
        leaf.subject_alt_names.push(SanType::IpAddress(listen.ip()));
        let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
        let cert = leaf.signed_by(&key, &issuer).expect("certificate");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone(), ca_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
        let mut api = Self::start_with(listen, token, Some(Arc::new(config)));
        api.ca_pem = Some(ca_cert.pem());
        api
    }

    fn start_with(listen: SocketAddr, token: &str, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = std::net::TcpListener::bind(listen).expect("bind the API server");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            inner: Mutex::default(),
            changed: tokio::sync::watch::channel(0).0,
            token: token.to_owned(),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let s = Arc::clone(&state);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(serve(listener, s, tls, stopped));
        });
        Self {
            addr,
            ca_pem: None,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Writes a kubeconfig for this server and `token` to `path`.
    ///
    /// # Panics
    /// When it cannot be written.
    pub fn kubeconfig(&self, path: &Path, token: &str) {
        let kc = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "test", "cluster": { "server": format!("http://{}", self.addr) } }],
            "users": [{ "name": "agent", "user": { "token": token } }],
            "contexts": [{ "name": "test", "context": { "cluster": "test", "user": "agent" } }],
            "current-context": "test",
        });
        std::fs::write(path, serde_yaml::to_string(&kc).expect("yaml")).expect("kubeconfig");
    }

    /// Registers node `name` with an `InternalIP`, as a kubelet does.
    pub fn add_node(&self, name: &str, internal_ip: &str) {
        self.state.put(
            NODES,
            "ADDED",
            json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": { "name": name, "uid": format!("uid-{name}"), "labels": { "kubernetes.io/hostname": name } },
                "status": { "addresses": [
                    { "type": "InternalIP", "address": internal_ip },
                    { "type": "Hostname", "address": name },
                ] },
            }),
        );
    }

    /// Deletes node `name`'s object, as `kubectl delete node` does.
    pub fn delete_node(&self, name: &str) {
        let object = self.node(name);
        if let Some(o) = object {
            self.state.put(NODES, "DELETED", o);
        }
    }

    fn node(&self, name: &str) -> Option<Value> {
        self.state
            .locked()
            .objects
            .get(&(NODES.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Creates or replaces `EndpointSlice` `name` in `namespace` for Service `service`, with
    /// `ports` and `endpoints` as the API has them (`[{"port": 80}]`, `[{"addresses": […],
    /// "conditions": {"ready": true}}]`), as the endpoint-slice controller writes it.
    pub fn put_endpoint_slice(
        &self,
        namespace: &str,
        name: &str,
        service: &str,
        ports: &Value,
        endpoints: &Value,
    ) {
        let collection = slices_of(namespace);
        let kind = if self
            .state
            .locked()
            .objects
            .contains_key(&(collection.clone(), name.to_owned()))
        {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.state.put(
            &collection,
            kind,
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": name, "namespace": namespace, "uid": format!("uid-{namespace}-{name}"),
                    "labels": { "kubernetes.io/service-name": service },
                },
                "addressType": "IPv4",
                "ports": ports,
                "endpoints": endpoints,
            }),
        );
    }

    /// Sets annotations on node `name`, as `kubectl annotate` does.
    pub fn annotate(&self, name: &str, annotations: &[(&str, &str)]) {
        let object = self.node(name);
        if let Some(mut o) = object {
            let patch = json!({ "metadata": { "annotations": annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), json!(v)))
                .collect::<serde_json::Map<_, _>>() } });
            merge_patch(&mut o, &patch);
            self.state.put(NODES, "MODIFIED", o);
        }
    }

    /// Node `name`'s annotations.
    #[must_use]
    pub fn annotations(&self, name: &str) -> BTreeMap<String, String> {
        self.node(name)
            .as_ref()
            .and_then(|n| n["metadata"]["annotations"].as_object().cloned())
            .map(|a| {
                a.into_iter()
                    .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every request so far, as `METHOD path?query`.
    #[must_use]
    pub fn requests(&self) -> Vec<String> {
        self.state.locked().requests.clone()
    }
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<State>,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stopped => return,
        };
        let Ok((sock, _)) = accepted else { continue };
        let state = Arc::clone(&state);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let http = hyper::server::conn::http1::Builder::new();
            match acceptor {
                None => {
                    let _ = http.serve_connection(TokioIo::new(sock), service).await;
                }
                Some(a) => {
                    if let Ok(tls) = a.accept(sock).await {
                        let _ = http.serve_connection(TokioIo::new(tls), service).await;
                    }
                }
            }
        });
    }
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

/// A `Status` error as the API server sends it.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decoded(v)))
        .collect()
}

/// `%XX` escapes of a query value decoded.
fn percent_decoded(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(x)) => {
                out.push(x);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a request reads: a collection, maybe one object of it.
struct Target {
    collection: String,
    name: Option<String>,
    list_kind: &'static str,
    api_version: &'static str,
}

fn target(path: &str) -> Option<Target> {
    if let Some(rest) = path.strip_prefix("/api/v1/nodes") {
        let name = match rest {
            "" => None,
            r if r.starts_with('/') && !r[1..].contains('/') => Some(r[1..].to_owned()),
            _ => return None,
        };
        return Some(Target {
            collection: NODES.to_owned(),
            name,
            list_kind: "NodeList",
            api_version: "v1",
        });
    }
    let rest = path.strip_prefix("/apis/discovery.k8s.io/v1/namespaces/")?;
    let (namespace, rest) = rest.split_once('/')?;
    (rest == "endpointslices").then(|| Target {
        collection: slices_of(namespace),
        name: None,
        list_kind: "EndpointSliceList",
        api_version: "discovery.k8s.io/v1",
    })
}

/// Whether `object` carries the label `labelSelector` asks for (`key=value`; none: all).
fn selected(object: &Value, q: &BTreeMap<String, String>) -> bool {
    let Some((k, v)) = q.get("labelSelector").and_then(|s| s.split_once('=')) else {
        return true;
    };
    object["metadata"]["labels"][k].as_str() == Some(v)
}

async fn handle(state: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    state.locked().requests.push(format!(
        "{} {}{}",
        req.method(),
        req.uri()
            .path_and_query()
            .map(ToString::to_string)
            .unwrap_or_default(),
        req.headers()
            .get("accept")
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.contains("as="))
            .map(|v| format!(" [{v}]"))
            .unwrap_or_default()
    ));
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", state.token));
    if !authorized {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let path = req.uri().path().to_owned();
    let q = query(&req);
    // `Accept: application/json;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`: the
    // objects' metadata alone, as the API server answers a metadata-only client.
    let metadata_only = req
        .headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("as=PartialObjectMetadata"));
    match (req.method().clone(), target(&path)) {
        (Method::GET, Some(t))
            if t.name.is_none() && q.get("watch").is_some_and(|w| w == "true" || w == "1") =>
        {
            watch(state, &q, t.collection, metadata_only)
        }
        (Method::GET, Some(t)) if t.name.is_none() => list(state, &t, &q, metadata_only),
        (method, Some(t)) if t.collection == NODES => {
            let name = t.name.unwrap_or_default();
            object(state, &method, &name, req).await
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

/// A collection's objects the selector picks, whole or as their metadata.
fn list(
    state: &Arc<State>,
    t: &Target,
    q: &BTreeMap<String, String>,
    metadata_only: bool,
) -> Response<Body> {
    let i = state.locked();
    let items: Vec<Value> = i
        .objects
        .iter()
        .filter(|((c, _), o)| *c == t.collection && selected(o, q))
        .map(|(_, n)| {
            if metadata_only {
                return partial(n);
            }
            // List items carry no kind or apiVersion.
            let mut n = n.clone();
            if let Some(o) = n.as_object_mut() {
                o.remove("kind");
                o.remove("apiVersion");
            }
            n
        })
        .collect();
    let (kind, api_version) = if metadata_only {
        ("PartialObjectMetadataList", "meta.k8s.io/v1")
    } else {
        (t.list_kind, t.api_version)
    };
    full(
        StatusCode::OK,
        &json!({
            "kind": kind, "apiVersion": api_version,
            "metadata": { "resourceVersion": i.rv.to_string() },
            "items": items,
        }),
    )
}

/// GET or merge-PATCH node `name`.
async fn object(
    state: &Arc<State>,
    method: &Method,
    name: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let node = state
        .locked()
        .objects
        .get(&(NODES.to_owned(), name.to_owned()))
        .cloned();
    let Some(node) = node else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("nodes \"{name}\" not found"),
        );
    };
    match *method {
        Method::GET => full(StatusCode::OK, &node),
        Method::PATCH => {
            let merge = req
                .headers()
                .get("content-type")
                .is_some_and(|c| c == "application/merge-patch+json");
            if !merge {
                return status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "this server takes application/merge-patch+json",
                );
            }
            let Ok(body) = req.into_body().collect().await else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "body");
            };
            let Ok(merge_doc) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
            };
            let mut patched = node;
            merge_patch(&mut patched, &merge_doc);
            full(StatusCode::OK, &state.put(NODES, "MODIFIED", patched))
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not served",
        ),
    }
}

/// An object as `PartialObjectMetadata`: its metadata alone.
fn partial(object: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object["metadata"],
    })
}

/// RFC 7386: objects merge, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// A watch: the events after `resourceVersion` (every object as `ADDED` without one), then
/// each change until `timeoutSeconds` (default 30 minutes) or the client goes.
fn watch(
    state: &Arc<State>,
    q: &BTreeMap<String, String>,
    collection: String,
    metadata_only: bool,
) -> Response<Body> {
    let from: Option<u64> = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0);
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(1800),
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let state = Arc::clone(state);
    let mut changed = state.changed.subscribe();
    let q = q.clone();
    tokio::spawn(async move {
        let line = |kind: &str, object: &Value| {
            let object = if metadata_only {
                partial(object)
            } else {
                object.clone()
            };
            Ok(Frame::data(Bytes::from(format!(
                "{}\n",
                json!({ "type": kind, "object": object })
            ))))
        };
        let mut seen = if let Some(rv) = from {
            rv
        } else {
            let (rv, nodes): (u64, Vec<Value>) = {
                let i = state.locked();
                (
                    i.rv,
                    i.objects
                        .iter()
                        .filter(|((c, _), o)| *c == collection && selected(o, &q))
                        .map(|(_, o)| o.clone())
                        .collect(),
                )
            };
            for n in &nodes {
                if tx.send(line("ADDED", n)).await.is_err() {
                    return;
                }
            }
            rv
        };
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let news: Vec<(u64, &'static str, String, Value)> = state
                .locked()
                .events
                .iter()
                .filter(|(rv, _, _, _)| *rv > seen)
                .cloned()
                .collect();
            for (rv, kind, c, object) in news {
                seen = rv;
                if c != collection || !selected(&object, &q) {
                    continue;
                }
                if tx.send(line(kind, &object)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                () = tokio::time::sleep_until(end) => return,
                () = tx.closed() => return,
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response")
}
