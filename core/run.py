"""``python -m core.run [key=value ...]``: train (or resume) a run. See docs/cli.md."""

from __future__ import annotations

import sys

from core.cli import guard, help_text, load_tree
from core.errors import ConfigError, UsageError
from core.registry import get_registry
from core.runconfig import DEFAULTS, resolve


@guard
def main(argv: list[str]) -> int:
    if argv and argv[0] == "list":
        if argv[1:]:
            raise ConfigError(f"list takes no arguments, got {' '.join(argv[1:])}; "
                              "for a plugin's options use python -m core.run help objective=NAME")
        print(get_registry().describe())
        return 0
    if argv and argv[0] == "plan":
        from core import plan

        return plan.main(argv[1:])
    if argv and argv[0] in ("help", "--help", "-h"):
        print(help_text(load_tree(argv[1:])))
        return 0
    from core.runner import Trainer

    if any(arg.split("=", 1)[0].split(".", 1)[0] == "sampler" for arg in argv):
        raise UsageError("sampler= is not a training setting (a run previews and exports with its objective's "
                         "sampler); use it with python -m core.sample teacher=NAME sampler=NAME")
    tree = load_tree(argv)
    if "sampler" in tree:  # from config=FILE: older runs saved the default sampler, which nothing read
        if tree.pop("sampler") != _legacy_sampler_entry():
            raise UsageError("the config.yaml sets a sampler, which is not a training setting (a run previews and "
                             "exports with its objective's sampler); delete its sampler: entry")
    cfg = resolve(tree)
    if cfg.train.dry_run:  # an alias of `python -m core.run plan` with the same overrides (issue 15)
        from core import plan

        return plan.main([arg for arg in argv if arg.split("=", 1)[0] != "train.dry_run"])
    trainer = Trainer(cfg)
    result = trainer.train()
    if result.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return 0
    metrics = " ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items())
    ck = result["checkpoint"]
    print(f"run:        {result['out']}")
    print(f"preview:    {result['preview']}")
    print(f"checkpoint: {result['out']}/checkpoints/{ck['dir']} (step {ck['step']})")
    print(f"student:    {result['export']}")
    if metrics:
        print(f"metrics:    {metrics}")
    print(f"sample it:  python -m core.sample run={result['out']} num=10000 out=samples.npz")
    return 0


def _legacy_sampler_entry() -> dict:
    """What config.yaml held as ``sampler`` before training runs stopped saving one: the default, resolved."""
    return resolve({"objective": "denoise", "sampler": DEFAULTS["sampler"]}).to_dict()["sampler"]


if __name__ == "__main__":
    sys.exit(main())
