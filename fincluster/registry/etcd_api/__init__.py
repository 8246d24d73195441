"""Python stubs of etcd's v3 gRPC API (KV, Lease, Watch, Auth, ...), generated from etcd's own .proto files.

The ``.proto`` files here are etcd v3.4's ``rpc.proto``, ``kv.proto`` and ``auth.proto`` with the
gogoproto and grpc-gateway annotations removed (they only matter to Go and to etcd's HTTP gateway);
``scripts/gen_etcd_api`` derives them from etcd's source tree and compiles them, and a test checks
the generated modules are current. etcd keeps its v3 API backward compatible across 3.x releases;
the tests run against etcd 3.4 (Debian's ``etcd-server``).
Why stubs rather than a client library: see :mod:`fincluster.registry.etcd`.
"""
