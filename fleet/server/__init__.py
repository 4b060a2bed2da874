"""A local etcd server for development, `fleet up` and tests."""
