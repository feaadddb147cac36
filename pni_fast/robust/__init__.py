"""The robustness toolkit around the PNI core: attacks, evaluation, training, data, checkpoints, CLI.

Import it explicitly (``import pni_fast.robust``) or through the names `pni_fast` keeps for it
(``pni_fast.pgd``, ``pni_fast.evaluate``, ``pni_fast.train``, ...), which load it on first use:
``import pni_fast`` alone loads only the core (kernels, ops, layers, conversion). Its own modules
need torch and numpy; the digits data set, progress bars and the demo's plot need the optional
extra (``pip install 'pni_fast[robust]'``: scikit-learn, tqdm, matplotlib), AutoAttack-rand and
Square need torchattacks (``pip install --no-deps torchattacks``). A missing one is an ImportError
that names the install.

Modules: `attacks` (FGSM, PGD, EOT-PGD, CW), `interop` (torchattacks' AutoAttack-rand and Square, and
EOT-Square), `evaluate` (mean +/- std and worst-of-k accuracy), `montecarlo` (`predict`: Monte-Carlo
prediction, and its accuracy against k), `train` (+ `config`, `epoch`), `data`, `checkpoint`, `modes`
(train/eval switching), `checks` (argument rules), and the subcommands `cli_demo`, `cli_train`,
`cli_eval` and `rng_stream` (the raw Philox words for outside test batteries).
"""

from . import attacks, checkpoint, data, evaluate, interop, train
from .attacks import carlini_wagner_l2, eot_pgd, fgsm, pgd
from .config import TrainConfig
from .evaluate import AttackSpec, EvalResult, format_results
from .interop import autoattack_rand, eot_square_attack, square_attack
from .modes import attack_mode, model_mode
from .montecarlo import SamplesCurve, accuracy_vs_samples, predict

__all__ = [
    "attacks",
    "interop",
    "evaluate",
    "train",
    "data",
    "checkpoint",
    "fgsm",
    "pgd",
    "eot_pgd",
    "carlini_wagner_l2",
    "autoattack_rand",
    "square_attack",
    "eot_square_attack",
    "predict",
    "accuracy_vs_samples",
    "SamplesCurve",
    "AttackSpec",
    "EvalResult",
    "format_results",
    "TrainConfig",
    "model_mode",
    "attack_mode",
]
