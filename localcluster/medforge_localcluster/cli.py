"""`medforge`: the command-line entry point. For now it drives the local cluster."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from medforge_localcluster import binaries
from medforge_localcluster.cluster import LocalCluster
from medforge_localcluster.errors import SetupError


def _localcluster(args: argparse.Namespace) -> int:
    cluster = LocalCluster(Path(args.state_dir) if args.state_dir else None)
    if args.action == "build":
        for name, path in sorted(binaries.ensure(list(binaries.BINARIES)).items()):
            print(f"{name}: {path}")
    elif args.action == "up":
        cluster.up()
        print(f"export KUBECONFIG={cluster.kubeconfig}   # or: eval $(medforge localcluster env)")
    elif args.action == "down":
        stopped = cluster.down(purge=args.purge)
        print(
            f"stopped: {', '.join(stopped) or 'nothing was running'}"
            + (f"; removed {cluster.dir}" if args.purge else "")
        )
    elif args.action == "env":
        if not cluster.healthy():
            raise SetupError("the local cluster is not up", hint="run `medforge localcluster up`")
        for key, value in cluster.env().items():
            print(f"export {key}={shlex.quote(value)}")
    elif args.action == "status":
        for name, ok in cluster.running().items():
            print(f"{name:26} {'running' if ok else 'stopped'}")
        print(f"{'api server':26} {'ready' if cluster.healthy() else 'not ready'}")
        return 0 if cluster.healthy() else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medforge", description="MedForge command line")
    sub = parser.add_subparsers(dest="command", required=True)
    lc = sub.add_parser(
        "localcluster",
        help="a local Kubernetes control plane and S3 server on 127.0.0.1",
        description="Real kube-apiserver, kube-controller-manager and etcd, a process kubelet "
        "and a versitygw S3 server, all on 127.0.0.1.",
    )
    lc.add_argument("action", choices=["build", "up", "down", "env", "status"])
    lc.add_argument(
        "--state-dir",
        help="where all state lives (default: "
        "$MEDFORGE_LOCALCLUSTER_DIR or ~/.cache/medforge/localcluster)",
    )
    lc.add_argument("--purge", action="store_true", help="with down: delete all state too")
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """`medforge localcluster ACTION` (also reached through medforge_cli's `medforge`)."""
    try:
        return _localcluster(args)
    except SetupError as exc:
        print(f"medforge: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as exc:
        print(f"medforge: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
