"""Accept `--speculative-model CKPT` on vLLM's command line (`vllm serve`).

Why: vLLM 0.32 spells it `--spec-model`; users and older docs use `--speculative-model`. How:
vLLM calls `load_general_plugins()` before it builds its argument parser, so we wrap
`EngineArgs.add_cli_args` to add the alias (same destination as `--spec-model`). Remove when
vLLM accepts the spelling itself.
"""

from vllm.engine.arg_utils import EngineArgs


def apply() -> None:
    original = EngineArgs.add_cli_args
    if getattr(original, "_ptp_patched", False):
        return

    def add_cli_args(parser):
        parser = original(parser)
        if "--speculative-model" not in parser._option_string_actions:
            parser.add_argument(
                "--speculative-model",
                dest="spec_model",
                default=None,
                help="Alias of --spec-model (added by vllm-ptp).",
            )
        return parser

    add_cli_args._ptp_patched = True
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
