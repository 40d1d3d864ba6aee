"""A SPIFFE Workload API client on gRPC C-core (Python grpcio), for quadrant's interop tests.

Usage: workload_api_client.py SOCKET raw|x509|py-spiffe

Dials SOCKET (a Unix socket) as every gRPC C-core client does, sending the percent-encoded socket
path as :authority. `raw` makes every Workload API call through stubs generated from the
published workload.proto (setup puts them in <venv>/stubs), `x509` only the X.509-SVID one;
`py-spiffe` makes them through py-spiffe, the SPIFFE project's Python library, which checks what
it receives against the SPIFFE specifications. (One mode per process: the stubs and py-spiffe's
own copy of the proto cannot share protobuf's descriptor pool.)
Prints one JSON object per check on stdout: {"check": NAME, "ok": true, ...figures} or
{"check": NAME, "ok": false, "code": GRPC_STATUS, "details": ...}. Exits 0 when it printed them
all, whatever they say: the caller decides what is expected.
"""

import json
import os
import sys

import grpc
from cryptography import x509

HEADER = (("workload.spiffe.io", "true"),)
TIMEOUT = 10.0


def emit(check, **fields):
    print(json.dumps({"check": check, **fields}, sort_keys=True), flush=True)


def failed(check, err):
    if isinstance(err, grpc.RpcError):
        emit(check, ok=False, code=err.code().name, details=err.details())
    else:
        emit(check, ok=False, code=type(err).__name__, details=str(err))


def der_chain(data):
    """Splits concatenated DER certificates."""
    certs = []
    while data:
        # DER SEQUENCE: 0x30, then the length (short or long form).
        if data[1] < 0x80:
            length, head = data[1], 2
        else:
            n = data[1] & 0x7F
            length, head = int.from_bytes(data[2 : 2 + n], "big"), 2 + n
        certs.append(x509.load_der_x509_certificate(data[: head + length]))
        data = data[head + length :]
    return certs


def uri_sans(cert):
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier)


def raw_checks(socket, only_x509):
    sys.path.insert(0, os.path.join(sys.prefix, "stubs"))
    import workload_pb2
    import workload_pb2_grpc

    with grpc.insecure_channel("unix:" + socket) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        raw_calls(stub, workload_pb2, only_x509)


def raw_calls(stub, workload_pb2, only_x509):
    try:
        first = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=TIMEOUT))
        svid = first.svids[0]
        chain = der_chain(svid.x509_svid)
        emit(
            "raw.x509_svid",
            ok=True,
            spiffe_id=svid.spiffe_id,
            uri_sans=uri_sans(chain[0]),
            chain=len(chain),
            key_bytes=len(svid.x509_svid_key),
            bundle_certs=len(der_chain(svid.bundle)),
        )
    except Exception as err:  # noqa: BLE001 - reported, the caller judges
        failed("raw.x509_svid", err)
    if only_x509:
        return
    try:
        first = next(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=TIMEOUT))
        emit(
            "raw.x509_bundles",
            ok=True,
            trust_domains=sorted(first.bundles.keys()),
            certs=sum(len(der_chain(b)) for b in first.bundles.values()),
        )
    except Exception as err:  # noqa: BLE001
        failed("raw.x509_bundles", err)
    token = None
    try:
        resp = stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["db"]), metadata=HEADER, timeout=TIMEOUT)
        token = resp.svids[0].svid
        emit("raw.jwt_svid", ok=True, spiffe_id=resp.svids[0].spiffe_id, parts=len(token.split(".")))
    except Exception as err:  # noqa: BLE001
        failed("raw.jwt_svid", err)
    try:
        first = next(stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER, timeout=TIMEOUT))
        keys = {td: len(json.loads(jwks)["keys"]) for td, jwks in first.bundles.items()}
        emit("raw.jwt_bundles", ok=True, keys=keys)
    except Exception as err:  # noqa: BLE001
        failed("raw.jwt_bundles", err)
    if token is not None:
        for audience, check in (("db", "raw.validate_jwt"), ("other", "raw.validate_jwt_wrong_audience")):
            try:
                resp = stub.ValidateJWTSVID(
                    workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token),
                    metadata=HEADER,
                    timeout=TIMEOUT,
                )
                aud = resp.claims.fields["aud"]
                audiences = [v.string_value for v in aud.list_value.values] or [aud.string_value]
                emit(check, ok=True, spiffe_id=resp.spiffe_id, aud=audiences)
            except Exception as err:  # noqa: BLE001
                failed(check, err)
    try:
        next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=TIMEOUT))
        emit("raw.no_header", ok=True)
    except Exception as err:  # noqa: BLE001
        failed("raw.no_header", err)


def py_spiffe_checks(socket):
    from spiffe import JwtSvid, TrustDomain, WorkloadApiClient

    try:
        with WorkloadApiClient(socket_path="unix:" + socket, default_timeout=TIMEOUT) as client:
            svid = client.fetch_x509_svid()
            bundles = client.fetch_x509_bundles()
            td = svid.spiffe_id.trust_domain
            bundle = bundles.get_bundle_for_trust_domain(td)
            emit(
                "py_spiffe.x509",
                ok=True,
                spiffe_id=str(svid.spiffe_id),
                chain=len(svid.cert_chain),
                bundle_authorities=len(bundle.x509_authorities) if bundle else 0,
            )
            jwt_svid = client.fetch_jwt_svid(audience={"db"})
            jwt_bundles = client.fetch_jwt_bundles()
            jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(TrustDomain(str(td)))
            # Signature checked against the JWKS the agent published.
            verified = JwtSvid.parse_and_validate(jwt_svid.token, jwt_bundle, {"db"})
            validated = client.validate_jwt_svid(jwt_svid.token, "db")
            emit(
                "py_spiffe.jwt",
                ok=True,
                spiffe_id=str(verified.spiffe_id),
                validated=str(validated.spiffe_id),
            )
    except Exception as err:  # noqa: BLE001
        cause = err.__cause__ or err.__context__
        failed("py_spiffe", cause if isinstance(cause, grpc.RpcError) else err)


def main():
    socket, mode = sys.argv[1], sys.argv[2]
    if mode == "py-spiffe":
        py_spiffe_checks(socket)
    elif mode in ("raw", "x509"):
        raw_checks(socket, mode == "x509")
    else:
        sys.exit("mode must be raw, x509 or py-spiffe")


if __name__ == "__main__":
    main()
