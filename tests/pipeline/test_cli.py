"""`slimpack pipeline digest|inspect` through the real command line entry point."""

from slimpack.cli import main
from slimpack.pipeline import LoaderConfig, PackedLoader

ARGS = ["--seq-len", "16", "--global-batch-tokens", "128"]


def _digests(out: str) -> list[str]:
    return [line.split()[2] for line in out.splitlines() if line.startswith("step ")]


def test_digest_matches_the_loader_for_any_world_size(dataset, capsys):
    loader = PackedLoader(LoaderConfig(str(dataset), seq_len=16, global_batch_tokens=128, micro_batch_size=8))
    start = loader.steps_per_epoch - 2  # crosses into epoch 1
    want = [loader.step_digest(s) for s in range(start, start + 4)]
    for extra in ([], ["--world-size", "2", "--micro-batch-size", "2"], ["--world-size", "4"],
                  ["--num-workers", "2", "--micro-batch-size", "1"]):
        assert main(["pipeline", "digest", str(dataset), *ARGS, "--steps", "4",
                     "--start-step", str(start), *extra]) == 0
        assert _digests(capsys.readouterr().out) == want


def test_digest_refuses_a_bad_layout_with_a_fix(dataset, capsys):
    assert main(["pipeline", "digest", str(dataset), *ARGS, "--steps", "1", "--world-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "world_size 3" in err and "global_batch_tokens in [96, 192]" in err


def test_inspect_marks_documents_and_windows(dataset, capsys):
    segments = []
    for step in range(4):  # documents run to 200 tokens: one 64-token micro-batch may hold no boundary
        assert main(["pipeline", "inspect", str(dataset), *ARGS, "--micro-batch-size", "4", "--step", str(step),
                     "--no-decode"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"step {step} micro-batch 0 of rank 0/1: 4 x 16 tokens")
        assert sum(line.startswith("=== window") for line in out) == 4
        segments += [line for line in out if line.startswith("  [")]
    assert any("<doc>" in s for s in segments) and any("</doc>" in s for s in segments)
    assert all(("<doc> '128000" in s) == ("<doc>" in s) for s in segments)  # a <doc> starts at its BOS


def test_inspect_refuses_a_micro_step_or_step_outside_the_layout(dataset, capsys):
    # grad_accum is 2 here: micro 2 would be step 3's micro 0, printed as step 2's.
    for args, fragment in ((["--step", "2", "--micro", "2"], "outside [0, grad_accum=2)"),
                           (["--step", "2", "--micro", "-1"], "outside [0, grad_accum=2)"),
                           (["--step", "-1"], "step -1 is negative")):
        assert main(["pipeline", "inspect", str(dataset), *ARGS, "--micro-batch-size", "4",
                     "--no-decode", *args]) == 2
        assert fragment in capsys.readouterr().err
