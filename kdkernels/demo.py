"""Demo: does distillation help a small student on real data? (``python -m kdkernels demo``)

One protocol is shared by every method; nothing is tuned per method or per seed.

- Data: scikit-learn's bundled digits dataset (1797 real 8x8 images, 10 classes, no download). A fixed stratified
  split (seed 0) holds out 30% (540 images) as the test set; features are standardized with the training split's
  statistics.
- Teacher: an MLP 64-256-256-10 trained with cross-entropy on the whole training split (1257 images; seed 0, Adam,
  lr 3e-3, batches of 64, 30 epochs).
- Students: an MLP 64-32-10 (2.4K parameters against the teacher's 85K) that sees only 10 labelled images per
  class (100 images, drawn per seed), trained with Adam (lr 1e-2, batches of 64) for 100 epochs, at which point the
  CE-only student has converged (400 epochs, or lr 1e-3 / 3e-3, leave it at 86-87%). The CE-only baseline minimises
  cross-entropy; each method minimises ``CE + distill_loss(method, student_logits, teacher_logits, target)``.
  For aekt the distillation loss is applied to ``SerialHead(10)(student_logits)`` and CE to the student's own
  logits (docs/losses.md); the head is dropped at test time.
- Hyperparameters: each method's defaults from ``METHODS`` (gdkd/cakd k=5 is fine with 10 classes), except the
  temperature. The divergences whose defaults are T=1 without T^2 scaling (rkl, jsd, skew_fkl, skew_rkl, tvd, abkd;
  LLM-distillation settings for vocabularies of 32K+) run with T=4 and T^2 scaling, the defaults of kd, dkd, gdkd,
  cakd and aekt. At T=1 the teacher's distribution on its own training images is one-hot in effect (mean top
  probability 0.9998), so it carries no more than the label: those six methods then land within 0.15 points of the
  CE-only student (+1.5 for rkl). ``--method-defaults`` runs every method at its ``METHODS`` defaults to show this.
  cakd's default ``strong="target"`` makes it coincide with dkd (docs/losses.md), so their rows are equal.
- Seeds: accuracies are averaged over 10 seeds. For each seed the baseline and every method start from the same
  initial weights and see the same labelled subset in the same batch order, so the comparison is paired; the table
  also says in how many seeds the distilled student beat the CE-only one. Accuracy is measured once, after the last
  epoch (no early stopping on the test set).
- Step time: forward + backward of the distillation loss alone, on a fixed batch (the teacher's and an untrained
  student's logits for one training batch, 64 x 10), for every backend in ``available_backends("cpu")``: a warm-up
  loop, then the best of 3 timed loops.
- ``--standardize``: each method also trains a student with logit standardization (``standardize=True``, the same
  temperature, seeds and data), reported in a column of its own.
- ``--learn-temperature``: each method also trains a student whose temperature is learned as CTKD does (Li et al.,
  AAAI 2023): T = 1 + 19 sigmoid(theta), theta a parameter starting at T = 4 (the method's T where it is not 4),
  trained adversarially through a gradient reversal (it ascends the distillation loss while the student descends it,
  at the same Adam learning rate), d loss / d T from the fused kernel; its column reports the accuracy and the mean
  learned T.
- ``--quick`` (the smoke run of the tests): 1 seed, teacher 10 epochs, students 40 epochs, short timed loops.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .backends import available_backends
from .functional import distill_loss
from .methods import METHODS
from .modules import SerialHead

NUM_CLASSES = 10
NUM_FEATURES = 64
TEST_FRACTION = 0.3
SPLIT_SEED = 0
TEACHER_SEED = 0
TEACHER_HIDDEN = (256, 256)
TEACHER_LR = 3e-3
STUDENT_HIDDEN = (32,)
STUDENT_LR = 1e-2
BATCH_SIZE = 64
TEMPERATURE = 4.0
# The demo's overrides of the METHODS defaults: every method runs at T=4 with T^2 scaling (see the module docstring).
OVERRIDES: dict[str, dict] = {
    name: {"temperature": TEMPERATURE, "t2_scale": True}
    for name, spec in METHODS.items()
    if (spec.temperature, spec.t2_scale) != (TEMPERATURE, True)
}


@dataclass(frozen=True)
class Schedule:
    """How long and on how much data the models train, and how long each timed loop runs."""

    seeds: int = 10
    per_class: int = 10
    epochs: int = 100
    teacher_epochs: int = 30
    timing_iters: int = 200


QUICK = Schedule(seeds=1, epochs=40, teacher_epochs=10, timing_iters=10)


@dataclass
class Data:
    """The standardized train and test splits: features [N, 64] float32, labels [N] int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data() -> Data:
    """The digits dataset, split once (stratified, fixed seed) and standardized with the training statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED
    )
    scaler = StandardScaler().fit(x_train)

    def features(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(scaler.transform(a)).float()

    return Data(features(x_train), torch.from_numpy(y_train).long(), features(x_test), torch.from_numpy(y_test).long())


def labelled_subset(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` examples of every class, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(y.numpy() == c), per_class, replace=False) for c in range(NUM_CLASSES)]
    return torch.from_numpy(np.sort(np.concatenate(picks)))


def mlp(hidden: Sequence[int], seed: int) -> nn.Sequential:
    """A ReLU MLP NUM_FEATURES -> hidden... -> NUM_CLASSES, initialised from ``seed``."""
    torch.manual_seed(seed)
    sizes = (NUM_FEATURES, *hidden)
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], NUM_CLASSES))


Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LearnedTemperature(nn.Module):
    """CTKD's global temperature: T = low + span sigmoid(theta), trained adversarially (its gradient reversed, so
    the optimiser's descent step ascends the loss in T)."""

    def __init__(self, initial: float, low: float = 1.0, span: float = 19.0):
        super().__init__()
        self.low, self.span = low, span
        share = (initial - low) / span
        self.theta = nn.Parameter(torch.tensor(float(np.log(share / (1 - share)))))
        self.theta.register_hook(torch.neg)

    def forward(self) -> torch.Tensor:
        return self.low + self.span * torch.sigmoid(self.theta)


def objective(
    y: torch.Tensor,
    method: str | None = None,
    teacher_logits: torch.Tensor | None = None,
    hyperparameters: Mapping[str, object] | None = None,
    head: nn.Module | None = None,
    temperature: LearnedTemperature | None = None,
) -> Objective:
    """loss(logits, batch indices into ``y``): CE, plus the distillation loss ``method`` when one is given.

    The distillation loss sees ``head(logits)`` when a head is given (aekt's SerialHead), CE the raw logits; a
    learned ``temperature`` replaces the hyperparameters' one.
    """

    def loss(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        target = y[index]
        ce = F.cross_entropy(logits, target)
        if method is None:
            return ce
        distilled = logits if head is None else head(logits)
        hp = dict(hyperparameters or {})
        if temperature is not None:
            hp["temperature"] = temperature()
        return ce + distill_loss(method, distilled, teacher_logits[index], target, **hp)

    return loss


def train(
    model: nn.Module,
    x: torch.Tensor,
    loss: Objective,
    epochs: int,
    lr: float,
    seed: int,
    extra: Sequence[nn.Module] = (),
    progress: tqdm | None = None,
) -> nn.Module:
    """Adam on shuffled minibatches of ``x`` (batch order fixed by ``seed``); ``extra`` modules train along.

    Used for the teacher, the CE-only students and the distilled students alike; ``progress`` ticks once per epoch.
    """
    optimizer = torch.optim.Adam([p for m in (model, *extra) for p in m.parameters()], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=generator).split(BATCH_SIZE):
            optimizer.zero_grad(set_to_none=True)
            loss(model(x[index]), index).backward()
            optimizer.step()
        if progress is not None:
            progress.update()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``."""
    return (model(x).argmax(-1) == y).float().mean().item()


def step_time(
    method: str,
    hyperparameters: Mapping[str, object],
    backend: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    iters: int,
    repeats: int = 3,
) -> float:
    """Seconds per forward + backward of the distillation loss on a fixed batch (best of ``repeats`` loops)."""
    student = student.detach().requires_grad_()

    def loop(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            distill_loss(method, student, teacher, target, backend=backend, **hyperparameters).backward()
        return (time.perf_counter() - start) / n

    loop(max(1, iters // 10))  # warm-up
    return min(loop(iters) for _ in range(repeats))


@dataclass
class Row:
    """One method's results: test accuracy per seed, the CE-only student's per seed, seconds per step per backend."""

    method: str
    hyperparameters: Mapping[str, object]
    accuracies: list[float]
    baseline: list[float]
    seconds: dict[str, float]
    standardized: list[float] | None = None  # with --standardize: the accuracies with standardize=True
    learned: list[float] | None = None  # with --learn-temperature: the accuracies with a learned T
    learned_temperatures: list[float] | None = None  # and the final T of each seed

    @property
    def wins(self) -> int:
        return sum(a > b for a, b in zip(self.accuracies, self.baseline))

    @property
    def beats_baseline(self) -> bool:
        return float(np.mean(self.accuracies)) > float(np.mean(self.baseline))


# Long: the demo's protocol in its order (data, teacher, a student per method, the table).
def run(
    schedule: Schedule,
    methods: Sequence[str],
    overrides: Mapping[str, dict],
    progress: bool = True,
    standardize: bool = False,
    learn_temperature: bool = False,
) -> tuple[list[Row], float, list[str]]:
    """Trains the teacher, the CE-only students and one student per method and seed (one more with
    ``standardize``: with standardize=True; one more with ``learn_temperature``: with a learned T); times every
    backend.

    Returns the table rows, the teacher's test accuracy and the backends timed.
    """
    data = load_data()
    backends = available_backends("cpu")
    seeds = range(schedule.seeds)
    subsets = [labelled_subset(data.y_train, schedule.per_class, seed) for seed in seeds]
    variants = 1 + standardize + learn_temperature
    total = schedule.teacher_epochs + schedule.epochs * schedule.seeds * (len(methods) * variants + 1)
    with tqdm(total=total, desc="training", unit="epoch", disable=not progress) as bar:
        bar.set_postfix_str("teacher")
        teacher = train(
            mlp(TEACHER_HIDDEN, TEACHER_SEED),
            data.x_train,
            objective(data.y_train),
            schedule.teacher_epochs,
            TEACHER_LR,
            TEACHER_SEED,
            progress=bar,
        )
        with torch.no_grad():
            teacher_logits = teacher(data.x_train)

        learned_temperatures: dict[str, list[float]] = {}

        def student_accuracy(method: str | None, seed: int, standardized: bool = False, learned: bool = False) -> float:
            variant = ", standardized" if standardized else ", learned T" if learned else ""
            bar.set_postfix_str(f"{method or 'CE only'}{variant}, seed {seed}")
            index = subsets[seed]
            head = SerialHead(NUM_CLASSES) if method == "aekt" else None
            hp = {**overrides.get(method, {}), **({"standardize": True} if standardized else {})}
            temperature = LearnedTemperature(hp.get("temperature", METHODS[method].temperature)) if learned else None
            loss = objective(data.y_train[index], method, teacher_logits[index], hp, head, temperature)
            extra = tuple(m for m in (head, temperature) if m is not None)
            model = train(
                mlp(STUDENT_HIDDEN, seed),
                data.x_train[index],
                loss,
                schedule.epochs,
                STUDENT_LR,
                seed,
                extra=extra,
                progress=bar,
            )
            if learned:
                learned_temperatures.setdefault(method, []).append(float(temperature().detach()))
            return accuracy(model, data.x_test, data.y_test)

        baseline = [student_accuracy(None, seed) for seed in seeds]
        accuracies = {m: [student_accuracy(m, seed) for seed in seeds] for m in methods}
        standardized = {m: [student_accuracy(m, seed, True) for seed in seeds] for m in methods} if standardize else {}
        learned = (
            {m: [student_accuracy(m, seed, learned=True) for seed in seeds] for m in methods}
            if learn_temperature
            else {}
        )

    index = subsets[0][:BATCH_SIZE]
    with torch.no_grad():
        student_logits = mlp(STUDENT_HIDDEN, 0)(data.x_train[index])
    batch = (student_logits, teacher_logits[index], data.y_train[index])
    rows = []
    for m in methods:
        hp = overrides.get(m, {})
        seconds = {b: step_time(m, hp, b, *batch, schedule.timing_iters) for b in backends}
        rows.append(
            Row(
                m,
                hp,
                accuracies[m],
                baseline,
                seconds,
                standardized.get(m),
                learned.get(m),
                learned_temperatures.get(m),
            )
        )
    return rows, accuracy(teacher, data.x_test, data.y_test), backends


def format_table(rows: Sequence[Row], teacher: float, backends: Sequence[str]) -> str:
    """The results as an aligned plain-text table (one step-time column per backend) and a summary line."""
    standardized = rows and rows[0].standardized is not None
    learned = rows and rows[0].learned is not None
    header = [
        "method",
        "overrides",
        "student acc",
        *(["standardized acc"] if standardized else []),
        *(["learned-T acc", "learned T"] if learned else []),
        "CE-only acc",
        "teacher acc",
        "wins",
        *(f"{b} us/step" for b in backends),
    ]

    def percent(values: Sequence[float]) -> str:
        return f"{100 * float(np.mean(values)):.2f}%"

    body = [
        [
            r.method,
            ", ".join(f"{k}={v}" for k, v in r.hyperparameters.items()) or "-",
            percent(r.accuracies),
            *([percent(r.standardized)] if standardized else []),
            *([percent(r.learned), f"{float(np.mean(r.learned_temperatures)):.2f}"] if learned else []),
            percent(r.baseline),
            percent([teacher]),
            f"{r.wins}/{len(r.accuracies)}",
            *(f"{1e6 * r.seconds[b]:.1f}" for b in backends),
        ]
        for r in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    beat = sum(r.beats_baseline for r in rows)
    return "\n".join(
        [
            line(header),
            line(["-" * w for w in widths]),
            *map(line, body),
            "",
            "wins: seeds where the distilled student beat the CE-only student (same initial weights and data)",
            f"distilled students beat the CE-only student for {beat} of {len(rows)} methods",
        ]
    )


def main(args) -> int:
    """Runs ``python -m kdkernels demo`` (``args`` as parsed by kdkernels.__main__); returns the exit code."""
    base = QUICK if args.quick else Schedule()
    given = {name: getattr(args, name) for name in ("seeds", "per_class", "epochs", "timing_iters")}
    schedule = replace(base, **{name: value for name, value in given.items() if value is not None})
    methods = list(dict.fromkeys(args.methods or METHODS))
    overrides = {} if args.method_defaults else OVERRIDES
    arch = "-".join(map(str, (NUM_FEATURES, *STUDENT_HIDDEN, NUM_CLASSES)))
    teacher_arch = "-".join(map(str, (NUM_FEATURES, *TEACHER_HIDDEN, NUM_CLASSES)))
    print(
        f"digits ({TEST_FRACTION:.0%} held out): teacher {teacher_arch}, {schedule.teacher_epochs} epochs; "
        f"students {arch} on {schedule.per_class} labelled images per class, {schedule.epochs} epochs, "
        f"mean over {schedule.seeds} seed(s); loss = CE + distill_loss"
    )
    rows, teacher, backends = run(
        schedule,
        methods,
        overrides,
        progress=not args.no_progress,
        standardize=args.standardize,
        learn_temperature=args.learn_temperature,
    )
    print(format_table(rows, teacher, backends))
    return 0
