"""``soco-compress``: the command line over :mod:`compress.pipeline`.

    soco-compress [MODEL] -o OUT [--method M] [--ratio R] [options]   compress (and evaluate)
    soco-compress eval DIR [options]                                  perplexity of a dense or soco folder
    soco-compress info DIR                                            manifest summary of a soco folder
    soco-compress selfchat [MODEL] -o FILE.jsonl [--n N]              the model's own chats, for --calib-chat
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import allocate, calibrate, data, decompose, methods, models, soco, workdir
from .config import DEFAULT_SHARED_KINDS, CompressConfig
from .recover import DEFAULT_STEPS, LAST_LOSSES, LR_SCALES, RecoverConfig, RecoveryError

USER_ERRORS = (
    models.ModelError, data.DataError, allocate.AllocationError, calibrate.CalibrationError,
    decompose.DecompositionError, soco.SocoError, RecoveryError, workdir.RunStateError, workdir.DiskFullError,
    FileExistsError, FileNotFoundError, ValueError,
)


def _size(text: str) -> int:
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    t = text.strip().upper()
    for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * f)
    return int(t)


def _ratios(text: str) -> list[float]:
    try:
        out = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio or comma-separated ratios, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("no ratio given")
    return out


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-text", default=None, metavar="SRC",
                   help="evaluation text: a .txt or .jsonl ('text' field) file, 'pydoc' (Python's reference "
                        "documentation: another domain) or 'wikitext2' (needs the hub); default: the evaluation "
                        "split of the embedded Wikipedia sample")
    g.add_argument("--eval-windows", type=int, default=32, metavar="N",
                   help="evaluate on the first N non-overlapping windows (0 = all; default 32)")
    g.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")


SOCO_DEFAULTS = soco.SocoConfig()


def compress_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soco-compress",
        description="Compress a Hugging Face causal LM into a low-rank soco checkpoint that "
                    "`vllm serve DIR --load-format soco` serves. Subcommands: `soco-compress eval DIR`, "
                    "`soco-compress info DIR` (see their --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None,
                   help="a local Hugging Face folder, a .gguf file, or a hub id; omitted: the embedded "
                        "SmolLM2-135M-Instruct")
    p.add_argument("-o", "--output", required=True, type=Path, help="checkpoint folder to write (must not exist)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--restart", action="store_true",
                   help="discard an unfinished run for OUTPUT instead of continuing it (a killed run continues "
                        "from its last finished group when the same command is run again; one with other settings "
                        "is refused without this flag)")
    m = p.add_argument_group("method")
    m.add_argument("--method", choices=sorted(methods.REGISTRY), default=methods.DEFAULT,
                   help="; ".join(f"{k}: {v.summary}" for k, v in methods.REGISTRY.items()))
    m.add_argument("--ratio", type=_ratios, default=[0.3],
                   help="fraction of the decoder linear layers' parameters to remove, in (0, 1); soco also takes "
                        "several (0.3,0.4,0.5): one training run, OUTPUT/ratio-<r> per ratio")
    m.add_argument("--group-size", type=int, default=None,
                   help="adjacent layers per shared basis (basis-sharing: default 2; soco: default 1 = private "
                        "factors, N > 1 = soco on shared bases; for those at 0.4 or more, --ratio 0.2,R trained "
                        "far more stably than --ratio R in our runs: docs/results.md)")
    m.add_argument("--shared-types", default=",".join(DEFAULT_SHARED_KINDS),
                   help="basis-sharing: matrix types that share a basis (others stay private)")
    m.add_argument("--coefficient-update", choices=("auto", "on", "off"), default="auto",
                   help="basis-sharing: refit each layer's coefficients on the compressed model's own "
                        "activations (slower; docs/results.md gives its time); auto = on unless --full-rank")
    m.add_argument("--asvd-alpha", type=float, default=0.5,
                   help="asvd: input channels are scaled by (mean |activation|)^ALPHA before truncation")
    m.add_argument("--force-factorize", action="store_true",
                   help="factorize even matrices whose factors would be larger than the dense matrix")
    m.add_argument("--full-rank", action="store_true",
                   help="factorize every matrix at full rank (ignores --ratio): reproduces the dense model; "
                        "for testing loaders")
    m.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype of the written tensors (auto: the model's)")
    d = SOCO_DEFAULTS
    s = p.add_argument_group("soco (learned component scores; defaults sized for a 2-core CPU, see compress/soco.py)")
    s.add_argument("--soco-steps", type=int, default=d.steps, help="training steps (one window batch each)")
    s.add_argument("--soco-lr", type=float, default=d.lr, help="Adam learning rate of the scores (stage 1; "
                                                             "stages 2-3 use --soco-fine-lr times it)")
    s.add_argument("--soco-fine-lr", type=float, default=d.fine_lr, help="learning-rate factor of stages 2 and 3")
    s.add_argument("--soco-seq-len", type=int, default=d.seq_len,
                   help="training window length: the calibration windows are cut to it")
    s.add_argument("--soco-batch-size", type=int, default=d.batch_size, help="training windows per step")
    s.add_argument("--soco-topk", type=int, default=d.topk, help="teacher log-probabilities kept per token")
    s.add_argument("--soco-stage1", type=float, default=d.stage1,
                   help="share of the steps over which stage 1 ramps the budget to the target")
    s.add_argument("--soco-stage3", type=float, default=d.stage3, help="share of the steps of stage 3 (the last)")
    s.add_argument("--soco-margin", type=float, default=d.margin,
                   help="--soco-budget penalty: stages 1-2 keep this fraction of the dense linear parameters "
                        "above the budget, stage 3 trims it (a projection needs no margin)")
    s.add_argument("--soco-budget", choices=("penalty", "projection"), default=d.budget,
                   help="how stages 1-2 reach the budget: each step pruning the lowest-ranked components to a budget "
                        "that ramps down, the kept scores trained by the distillation alone (projection), or a "
                        "penalty on the soft count of components in use (the paper's)")
    s.add_argument("--soco-sparsity", type=float, default=d.sparsity, help="weight of the stage-3 sparsity term")
    s.add_argument("--soco-init", choices=("full", "breakeven"), default=d.init,
                   help="components trained: all, or each matrix's break-even rank (cheaper steps)")
    s.add_argument("--soco-prior", type=float, default=d.prior,
                   help="rank and push components by score x (sigma / rms sigma of the matrix)^PRIOR; 0 = scores alone")
    s.add_argument("--soco-seed", type=int, default=d.seed, help="seed of the training window order")
    s.add_argument("--soco-offload", choices=("auto", "on", "off"), default="auto",
                   help="during training, onload each group of layers (dense weights and factors) for each use "
                        "(on: memory of one group, slower), or hold them all (off); auto: hold them when they need "
                        "less than half the available memory")
    r = p.add_argument_group("recovery (distill the kept factors against the dense model, group by group; "
                             "see compress/recover.py)")
    rd = RecoverConfig()
    r.add_argument("--recover-steps", type=int, default=None, metavar="N",
                   help=f"optimizer steps per group (one calibration batch each); 0 = no recovery; default "
                        f"{DEFAULT_STEPS}, or 0 with --full-rank or several ratios")
    r.add_argument("--recover-lr", type=float, default=rd.lr,
                   help="AdamW learning rate (cosine decay); with --recover-lr-scale rms, relative to each tensor's RMS")
    r.add_argument("--recover-lr-scale", choices=LR_SCALES, default=rd.lr_scale,
                   help="rms: each tensor's rate is --recover-lr times its RMS, so a step changes every tensor by about "
                        "the same fraction on any model; none: --recover-lr is the rate of every tensor")
    r.add_argument("--recover-last-loss", choices=LAST_LOSSES, default=rd.last_loss,
                   help="what the model's last group is trained to match: hidden (the dense output hidden state, like "
                        "every group) or kl (the dense model's next-token distribution through the final norm and head, "
                        "top-k KL: the model's own objective; one extra head pass per step)")
    r.add_argument("--recover-kl-stride", type=int, default=rd.kl_stride, metavar="N",
                   help="with --recover-last-loss kl, take the KL at every N-th position (1: all); the head's product "
                        "with the whole vocabulary, not the group, is what the last group's steps cost")
    r.add_argument("--recover-kl-groups", type=int, default=rd.kl_groups, metavar="K",
                   help="with --recover-last-loss kl, train the last K groups on the KL, each through the dense layers "
                        "after it (memory: K groups onloaded; time grows with K)")
    r.add_argument("--recover-kl-steps", type=int, default=rd.kl_steps, metavar="N",
                   help="with --recover-last-loss kl, the KL groups' own steps (default: --recover-steps; each costs "
                        "a pass through the head). More steps everywhere bought more than more here (docs/results.md)")
    r.add_argument("--recover-warmup", type=int, default=rd.warmup, metavar="N",
                   help="steps of linear learning-rate warm-up in every group, before the cosine decay")
    r.add_argument("--recover-holdout", type=float, default=rd.holdout,
                   help="share of the calibration batches held out: early stopping keeps the best held-out state")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-text", default=None, metavar="SRC",
                   help="calibration text (.txt, .jsonl, or 'wikitext2'); default: the calibration split "
                        "of the embedded Wikipedia sample")
    c.add_argument("--calib-chat", default=None, metavar="FILE.jsonl|articles",
                   help="chats, one {\"messages\": [...]} per line (a chat dataset, or the model's own from "
                        "'soco-compress selfchat'), or 'articles': the default text's calibration articles, each "
                        "the answer to 'Tell me about TITLE.'; rendered with the model's chat template: an "
                        "instruct model calibrated on plain text alone stops answering in its chat format")
    c.add_argument("--calib-chat-share", type=float, default=CompressConfig.calib_chat_share,
                   help="share of the calibration windows cut from --calib-chat")
    c.add_argument("--calib-windows", type=int, default=CompressConfig.calib_windows,
                   help="random windows of --seq-len tokens (the papers: 256 windows of 2048)")
    c.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    c.add_argument("--seed", type=int, default=0, help="seed for the calibration windows")
    _add_eval_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    o = p.add_argument_group("output")
    o.add_argument("--max-shard-size", type=_size, default="2GiB", help="largest safetensors shard")
    o.add_argument("--device", default="cpu", help="torch device for calibration and decomposition (cpu, cuda, cuda:N)")
    o.add_argument("--activations", choices=("device", "cpu", "disk"), default="device",
                   help="where the calibration and evaluation activations wait between layers (cpu: saves GPU "
                        "memory; disk: memory-mapped files beside the output, for calibration sets larger than "
                        "memory)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soco-compress eval",
                                description="Perplexity of a dense Hugging Face folder or a soco checkpoint.")
    p.add_argument("dir", type=Path)
    _add_eval_args(p)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def info_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soco-compress info", description="Summary of a soco checkpoint's manifest.")
    p.add_argument("dir", type=Path)
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    return p


def selfchat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soco-compress selfchat",
        description="The dense model's own chats (it writes a request, then answers it), one {\"messages\": [...]} "
                    "per line: calibration data for an instruct model (--calib-chat) where no chat dataset is at "
                    "hand. Holds the whole model in memory (see compress/selfchat.py).")
    p.add_argument("model", nargs="?", default=None, help="Hugging Face folder, .gguf file or hub id (default: the "
                                                          "embedded default model)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .jsonl file to write")
    p.add_argument("--n", type=int, default=64, help="chats to write")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer (a request: half of it)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--no-progress", action="store_true")
    return p


def cmd_selfchat(argv: list[str]) -> int:
    from .models import load_model
    from .selfchat import self_chats, write_chats

    a = selfchat_parser().parse_args(argv)
    if a.output.suffix != ".jsonl":
        raise ValueError(f"{a.output}: the output must be a .jsonl file (what --calib-chat reads)")
    if a.n < 1 or a.max_new_tokens < 2:
        raise ValueError(f"--n must be at least 1 and --max-new-tokens at least 2, got {a.n} and {a.max_new_tokens}")
    if a.output.exists() and not a.force:
        raise FileExistsError(f"{a.output} exists; pass --force to replace it")
    model, tok, source = load_model(a.model)
    chats = self_chats(model, tok, a.n, a.max_new_tokens, a.batch_size, a.seed, progress=not a.no_progress)
    write_chats(chats, a.output, force=a.force)
    print(f"wrote {a.output}: {len(chats)} chats of {source}")
    return 0


def cmd_compress(argv: list[str]) -> int:
    from .pipeline import run
    from .report import summary_lines

    a = compress_parser().parse_args(argv)
    group_size = a.group_size if a.group_size is not None else methods.get(a.method).default_group_size
    sc = soco.SocoConfig(steps=a.soco_steps, lr=a.soco_lr, fine_lr=a.soco_fine_lr, seq_len=a.soco_seq_len,
                         batch_size=a.soco_batch_size, topk=a.soco_topk, stage1=a.soco_stage1, stage3=a.soco_stage3,
                         margin=a.soco_margin, budget=a.soco_budget, sparsity=a.soco_sparsity, init=a.soco_init, prior=a.soco_prior,
                         seed=a.soco_seed)
    cfg = CompressConfig(
        output=a.output, model=a.model, method=a.method, ratio=a.ratio[0],
        ratios=tuple(a.ratio) if len(a.ratio) > 1 else (), group_size=group_size, soco=sc,
        shared_types=tuple(s for s in a.shared_types.split(",") if s), coefficient_update=a.coefficient_update,
        asvd_alpha=a.asvd_alpha,
        force_factorize=a.force_factorize, full_rank=a.full_rank, dtype=a.dtype, calib_text=a.calib_text,
        calib_chat=a.calib_chat, calib_chat_share=a.calib_chat_share,
        calib_windows=a.calib_windows, seq_len=a.seq_len, batch_size=a.batch_size, seed=a.seed,
        evaluate=not a.no_eval, eval_text=a.eval_text, eval_windows=a.eval_windows, force=a.force,
        max_shard_bytes=a.max_shard_size, device=a.device, activations=a.activations, soco_offload=a.soco_offload,
        restart=a.restart,
        progress=not a.no_progress,
        recover=RecoverConfig(steps=a.recover_steps, lr=a.recover_lr, lr_scale=a.recover_lr_scale,
                              holdout=a.recover_holdout, last_loss=a.recover_last_loss,
                              kl_stride=a.recover_kl_stride, warmup=a.recover_warmup,
                              kl_groups=a.recover_kl_groups, kl_steps=a.recover_kl_steps),
    )
    report = run(cfg)
    for path, rep in report.get("checkpoints", {str(cfg.output): report}).items():
        print("\n".join(summary_lines(rep)))
        print(f"wrote {path} (report.json, ranks.png inside)")
    return 0


def cmd_eval(argv: list[str]) -> int:
    from transformers import AutoTokenizer

    from .evaluate import perplexity
    from .models import load_any

    a = eval_parser().parse_args(argv)
    if not a.dir.is_dir():
        raise FileNotFoundError(f"{a.dir}: folder not found")
    tok = AutoTokenizer.from_pretrained(a.dir)
    windows = data.text_eval_windows(tok, a.eval_text, a.seq_len, a.eval_windows)
    res = perplexity(load_any(a.dir), windows, a.batch_size)
    if a.json:
        print(json.dumps({"ppl": res.ppl, "eval_tokens": res.tokens, "windows": res.windows}))
    else:
        print(f"perplexity {res.ppl:.4f} over {res.tokens:,} tokens ({res.windows} windows of {a.seq_len})")
    return 0


def cmd_info(argv: list[str]) -> int:
    from soco_serve.layout import CheckpointReader

    a = info_parser().parse_args(argv)
    reader = CheckpointReader(a.dir)
    m = reader.manifest
    if a.json:
        print(json.dumps(m.to_json(), indent=2))
        return 0
    kinds: dict[str, int] = {}
    for e in m.linears.values():
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    print(f"soco checkpoint v{m.format_version}: {a.dir}")
    print(f"  architecture   {m.architecture}  dtype {m.dtype}")
    print(f"  source         {m.source_model}  (sha256 {m.source_sha256[:16]}…)")
    print(f"  method         {m.method}  {json.dumps(m.settings)}")
    print(f"  ratios         target {m.target_ratio}  achieved {m.achieved_ratio}  whole model {m.model_ratio}")
    print(f"  linears        " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + f"; {len(m.bases)} shared bases")
    print(f"  files          {reader.file_bytes() / 1e6:.1f} MB in {len({i.file for i in reader.tensors.values()})} shard(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from soco_serve.layout import CheckpointError

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"eval": cmd_eval, "info": cmd_info, "selfchat": cmd_selfchat}
    cmd = commands.get(argv[0]) if argv else None
    try:
        return cmd(argv[1:]) if cmd else cmd_compress(argv)
    except (CheckpointError, *USER_ERRORS) as exc:
        print(f"soco-compress: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
