"""A local Kubernetes control plane for tests and demos.

Real upstream kube-apiserver, kube-controller-manager and etcd on 127.0.0.1, a process kubelet that
runs pods as local processes, and a real S3 server (versitygw).
"""
