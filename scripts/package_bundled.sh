#!/usr/bin/env bash
# Rebuild rgemma's bundled model from scratch (tokenizer, training, packaging, evaluation).
# Each step can be rerun on its own; training can be stopped and resumed any number of times.
#
#   bash scripts/package_bundled.sh            # everything
#   SKIP_TRAIN=1 bash scripts/package_bundled.sh   # package + evaluate an existing runs/bundled
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f src/rgemma/assets/bundled/tokenizer.model ]; then
    bash scripts/train_tokenizer.sh
fi
if [ -z "${SKIP_TRAIN:-}" ]; then
    # --resume continues a stopped run; a finished run is left as it is.
    if [ -d runs/bundled/checkpoints ]; then
        rgemma train --config configs/bundled.json --resume
    else
        rgemma train --config configs/bundled.json
    fi
fi

python - <<'PY'
import json, shutil
from pathlib import Path
import torch
import rgemma

final = Path("runs/bundled/final")
out = Path("src/rgemma/assets/bundled")
model = rgemma.load_model(final, dtype=torch.bfloat16)   # shipped in bfloat16
rgemma.save_model(model, out, tokenizer_path="src/rgemma/assets/bundled/tokenizer.model")
shutil.copy("data/LICENSES.md", out / "LICENSE-DATA.md")
events = [json.loads(l) for l in open("runs/bundled/metrics.jsonl")]
end = [e for e in events if e.get("event") == "end"][-1]
train_s = sum(e["elapsed_s"] for e in events if e.get("event") == "end")
(out / "training.json").write_text(json.dumps({
    "config": "configs/bundled.json",
    "steps": end["step"],
    "tokens_seen": end["tokens_seen"],
    "final_val_loss": end.get("val_loss"),  # validation documents scored whole
    "elapsed_s_all_sessions": train_s,
}, indent=2) + "\n")
PY
python scripts/eval_bundled.py --out src/rgemma/assets/bundled/eval.json
