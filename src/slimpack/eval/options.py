"""Command-line options the evaluations share: STRING and the device."""

from __future__ import annotations

import argparse

from slimpack.eval.niah import StringChoice


def _shift(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        shift = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a token count nor 'auto'") from None
    if shift < 0:
        raise argparse.ArgumentTypeError(f"{shift} is negative; give S >= 2, 'auto', or 0 for no STRING")
    return shift


def add_string_arguments(p: argparse.ArgumentParser) -> None:
    """STRING's flags; `string_choice(args)` reads them."""
    g = p.add_argument_group("STRING (arXiv 2410.18745 section 4; off unless --string-shift is given)")
    g.add_argument("--string-shift", type=_shift, default=0, metavar="S|auto",
                   help="use relative distances d >= S as d - S + W; 'auto': S = int(R x the prompt budget) per "
                        "length, as the paper's scripts (0, the default: plain RoPE)")
    g.add_argument("--string-ratio", type=float, default=0.5, metavar="R",
                   help="R for --string-shift auto (0.5, the needle script's default; its README suggests 0.33)")
    g.add_argument("--string-window", type=int, default=128, metavar="W", help="STRING's local window W (128)")
    g.add_argument("--string-scale", type=float, default=StringChoice.scale, metavar="F",
                   help="factor on RoPE's cos and sin while STRING is on, so logits scale by F^2 (the paper "
                        "code's attention_factor 0.1 ln 2 + 1 = 1.0693; 1 turns it off)")
    g.add_argument("--string-diagonal", choices=("paper", "exclusive"), default="paper",
                   help="paper: prefill's diagonal part keeps d <= S, so the key at d = S is also in the "
                        "shifted part, as the paper's FlashAttention window; exclusive: d < S (each key once)")


def string_choice(args: argparse.Namespace) -> StringChoice | None:
    """The STRING the flags ask for, or None (plain RoPE)."""
    if args.string_shift == 0:
        return None
    if args.string_shift is not None and args.string_shift < 2:
        raise ValueError(f"--string-shift {args.string_shift}: STRING needs S >= 2 (the paper's scripts turn it "
                         f"off at S <= 1); give 0 for plain RoPE")
    if not 0 < args.string_ratio < 1:
        raise ValueError(f"--string-ratio {args.string_ratio} must lie in (0, 1)")
    if args.string_window < 0 or not args.string_scale > 0:
        raise ValueError(f"--string-window {args.string_window} must be >= 0 and --string-scale "
                         f"{args.string_scale} positive")
    return StringChoice(args.string_shift, args.string_ratio, args.string_window, args.string_scale,
                        overlap=args.string_diagonal == "paper")


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (a GPU if present), cuda or cpu")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on a GPU, else fp32")
