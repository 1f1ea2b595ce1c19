"""lstm_lm.py with nn.GRU (word_language_model --model GRU): until round 32 the C++ client failed at its first step
(torch has no Meta kernel for `_thnn_fused_gru_cell`: client/native/backend.py `_gru_cell_metas`)."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).with_name("lstm_lm.py")), init_globals={"CELL": "GRU"}, run_name="__main__")
