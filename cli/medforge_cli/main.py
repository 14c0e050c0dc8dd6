"""`medforge`: one entry point, a subcommand per task. Every failure is one line on stderr and a
non-zero exit: 2 for a bad argument or input, 1 for everything else."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from medforge_cli.errors import CliError

EXAMPLES = """examples:
  medforge status                                  every namespace you may read
  medforge describe composite foundation -n medforge-forge
  medforge logs chest-xray-2026-11 -n hospital-a
  medforge wait composite foundation -n medforge-forge --revision 2 --timeout 3600
  medforge model push ./clip-vit-b16 --name clip-vit-b16 --register
  medforge model verify clip-vit-b16
  medforge composite pull foundation -n medforge-forge --format peft -o ./foundation-peft
  medforge predict --composite foundation -n medforge-forge scan1.png scan2.png --json
  medforge evaluate --composite ./foundation-raw ./held-out --task chest-xray
  medforge localcluster up
"""


def _kube_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    p.add_argument("-n", "--namespace", help="namespace (default: the context's)")


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", help="S3 endpoint of the forge store ($MEDFORGE_STORE_ENDPOINT)")
    p.add_argument("--bucket", help="forge bucket ($MEDFORGE_STORE_BUCKET)")
    p.add_argument("--region", help="store region ($MEDFORGE_STORE_REGION, default us-east-1)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--composite",
        required=True,
        help="a folder from `medforge composite pull --format raw`, or a composite's name",
    )
    p.add_argument("--revision", type=int, help="with a name: this revision (default: served)")
    p.add_argument(
        "--base-model",
        help="the base model's folder (default: fetched from the forge store and verified)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    _store_args(p)
    _kube_args(p)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medforge",
        description="MedForge: hospitals build a medical foundation model together from LoRA "
        "contributions, without pooling patient data.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help_: str, epilog: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog="example:\n  " + epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    _follow_commands(cmd)
    _model_commands(cmd)
    _composite_commands(cmd)
    _institution_commands(cmd)
    _inference_commands(cmd)
    lc = cmd(
        "localcluster",
        "a local Kubernetes control plane and S3 server on 127.0.0.1",
        "medforge localcluster up",
    )
    lc.add_argument("action", choices=["build", "up", "down", "env", "status"])
    lc.add_argument("--state-dir", help="where its state lives")
    lc.add_argument("--purge", action="store_true", help="with down: delete all state too")
    return p


Command = Callable[[str, str, str], argparse.ArgumentParser]


def _follow_commands(cmd: Command) -> None:
    s = cmd("status", "contributions and composites as a table", "medforge status -A")
    _kube_args(s)
    s.add_argument(
        "-A", "--all-namespaces", action="store_true", help="every namespace you may list"
    )

    d = cmd(
        "describe",
        "a composite: revisions, inputs and their reasons, metrics, a per-task score chart",
        "medforge describe composite foundation -n medforge-forge",
    )
    d.add_argument("kind", choices=["composite"], help="what to describe")
    d.add_argument("name")
    _kube_args(d)

    lg = cmd(
        "logs",
        "the training Job's output of a contribution",
        "medforge logs chest-xray-2026-11 -n hospital-a --tail 50",
    )
    lg.add_argument("name", help="the LoRAContribution")
    lg.add_argument("--tail", type=int, default=None, help="only the last N lines of each pod")
    _kube_args(lg)

    w = cmd(
        "wait",
        "wait until a contribution succeeded, a composite serves a revision or a "
        "base model is verified; exit 1 when it failed or the time ran out",
        "medforge wait contribution chest-xray-2026-11 -n hospital-a --timeout 7200",
    )
    w.add_argument("kind", help="contribution, composite or basemodel")
    w.add_argument("name")
    w.add_argument("--revision", type=int, help="composite: at least this revision")
    w.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
    w.add_argument("--interval", type=float, default=2.0, help="seconds between checks")
    w.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    _kube_args(w)


def _model_commands(cmd: Command) -> None:
    m = cmd(
        "model",
        "publish or check a base model in the forge store",
        "medforge model push ./clip-vit-b16 --name clip-vit-b16 --register",
    )
    msub = m.add_subparsers(dest="action", required=True, metavar="ACTION")
    push = msub.add_parser(
        "push",
        help="upload a save_pretrained folder with its manifest",
        description="Refuses pickle formats, writes the manifest (sha256 of every file, nested "
        "folders included) without importing torch, uploads with multipart transfers, checks "
        "what landed, and registers the BaseModel (--register) or prints its YAML.",
        epilog="example:\n  medforge model push ./clip-vit-b16 --name clip-vit-b16 --register",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    push.add_argument("directory")
    push.add_argument("--name", required=True, help="the BaseModel's name (and store folder)")
    push.add_argument(
        "--sign-key",
        help="a PEM EC private key: sign the model (signature.sigstore.json) and register its "
        "public key as spec.publicKey",
    )
    push.add_argument(
        "--register",
        action="store_true",
        help="create or update the BaseModel (needs the platform team's rights)",
    )
    _store_args(push)
    _kube_args(push)
    verify = msub.add_parser(
        "verify",
        help="re-check a stored base model: its manifest and every file's sha256",
        epilog="example:\n  medforge model verify clip-vit-b16 --digest sha256:...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("name", help="the store folder under base-models/ (the BaseModel)")
    verify.add_argument("--digest", help="the manifest digest it must have")
    verify.add_argument("--public-key", help="a PEM public key the model must be signed with")
    verify.add_argument(
        "--trust", help="or the trust file (`medforge institution export`) naming its key"
    )
    verify.add_argument(
        "--dir", help="check this local folder offline instead of the store (no credentials)"
    )
    _store_args(verify)


def _composite_commands(cmd: Command) -> None:
    c = cmd(
        "composite",
        "take a composite revision out of the forge",
        "medforge composite pull foundation -n medforge-forge --format peft -o ./out",
    )
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    pull = csub.add_parser(
        "pull",
        help="download a revision, verify every digest, write it as raw files or a "
        "peft adapter folder",
        epilog="example:\n  medforge composite pull foundation -n medforge-forge --revision 3 "
        "--format peft -o ./foundation-r3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pull.add_argument("name")
    pull.add_argument("--revision", type=int, help="default: the served revision")
    pull.add_argument(
        "--format",
        choices=["raw", "peft", "merged"],
        default="peft",
        help="raw: the files as stored; peft: an adapter folder PeftModel.from_pretrained loads; "
        "merged: the base model with the update folded in (save_pretrained, safetensors)",
    )
    pull.add_argument(
        "--rank",
        type=int,
        default=None,
        help="peft from a dense strategy (ties, dare): the rank to keep",
    )
    pull.add_argument(
        "--allow-withdrawn",
        action="store_true",
        help="take a revision that held a withdrawn input (by --revision, while its files are "
        "kept): for an audit, never to serve",
    )
    pull.add_argument("-o", "--output", required=True, help="folder to write (must be empty)")
    _chain_args(pull)
    pull.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the chain of custody (the digests are still checked)",
    )
    _store_args(pull)
    _kube_args(pull)
    ver = csub.add_parser(
        "verify",
        help="check a pulled revision's chain of custody offline: the forge's signature, "
        "every file's sha256, every input's signature; exit 0 only when all hold",
        epilog="example:\n  medforge institution export -o trust.json\n  medforge composite "
        "pull foundation -n medforge-forge --format raw -o ./r3\n  medforge composite verify "
        "foundation -n medforge-forge --dir ./r3 --trust trust.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ver.add_argument("name", help="the composite (its namespace names the forge's keys)")
    ver.add_argument("-n", "--namespace", required=True, help="the composite's namespace")
    ver.add_argument("--revision", type=int, help="the revision the folder must hold")
    ver.add_argument("--dir", required=True, help="a folder from `composite pull --format raw`")
    _chain_args(ver, required=True)


def _chain_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--trust",
        required=required,
        help="the trust file (`medforge institution export`)"
        + ("" if required else "; default: the cluster's Institutions now"),
    )
    p.add_argument(
        "--allow-unsigned-inputs",
        action="store_true",
        help="accept inputs that carry no signature (every signature present is still checked)",
    )


def _institution_commands(cmd: Command) -> None:
    i = cmd(
        "institution",
        "the hospitals' and the forge's public keys (Institutions)",
        "medforge institution export -o trust.json",
    )
    isub = i.add_subparsers(dest="action", required=True, metavar="ACTION")
    ex = isub.add_parser(
        "export",
        help="write the trust file: every Institution's namespace and keys (Revoked ones "
        "marked), the root that `composite verify` trusts",
    )
    ex.add_argument("-o", "--output", help="file to write (default: standard output)")
    _kube_args(ex)


def _inference_commands(cmd: Command) -> None:
    pr = cmd(
        "predict",
        "class probabilities per image and task, from a composite (a pulled folder or a "
        "composite's name) on its verified base model",
        "medforge predict --composite foundation -n medforge-forge scan1.png scan2.png",
    )
    pr.add_argument("images", nargs="+", help="image files")
    _model_args(pr)
    pr.add_argument("--json", action="store_true", help="JSON instead of a table")

    ev = cmd(
        "evaluate",
        "accuracy, macro-F1 and ROC-AUC of a composite on a labelled folder (one subfolder per "
        "class), per task",
        "medforge evaluate --composite ./foundation-raw ./held-out/ --task chest-xray",
    )
    ev.add_argument("folder", help="a folder with one subfolder of images per class")
    ev.add_argument(
        "--task",
        help="the task whose classes the subfolders are (default: every task whose classes "
        "they match)",
    )
    _model_args(ev)
    ev.add_argument("--json", action="store_true", help="JSON instead of a table")


def _dispatch(args: argparse.Namespace) -> Callable[[], int]:
    if args.command == "localcluster":
        from medforge_localcluster import cli as lc

        return lambda: lc.run(args)
    action = getattr(args, "action", None)  # commands without sub-actions have none
    if args.command == "institution" or (args.command, action) == ("composite", "verify"):
        from medforge_cli import trust

        return lambda: trust.export(args) if args.command == "institution" else trust.verify(args)
    if args.command in ("model", "composite"):
        from medforge_cli import models

        return lambda: models.run(args)
    if args.command in ("predict", "evaluate"):
        from medforge_cli import inference

        return lambda: inference.run(args)
    from medforge_cli import follow
    from medforge_cli.cluster import Cluster

    def run() -> int:
        cl = Cluster.connect(args.kubeconfig, args.context)
        handler: Callable[[Cluster, argparse.Namespace], int] = getattr(follow, args.command)
        return handler(cl, args)

    return run


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return _dispatch(args)()
    except CliError as exc:
        print(f"medforge: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("medforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
