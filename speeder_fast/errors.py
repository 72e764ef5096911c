"""Error types, the one CLI error contract, and friendly diagnostics for production training.

**One hierarchy.** Every error the library raises *for the user* (bad input, bad config, a corrupt
checkpoint, ...) is a :class:`SpeederError`; classes whose callers rely on ``except ValueError``
keep ``ValueError`` as a second base. Each class carries the exit status its CLI returns::

    SpeederError                          exit 2   (base; message meant for the user)
    ├── ConfigError(ValueError)           exit 2   a config key is wrong (speeder_fast.config re-exports it)
    ├── UsageError(ValueError)            exit 2   a command-line argument is wrong
    ├── DataError(ValueError)             exit 2   the data cannot be used as configured
    │   ├── DataFormatError               exit 2   an input file is malformed: names file, line, field
    │   └── CatalogueTooSmallError        exit 2   too few never-interacted items (data.n_candidates)
    ├── CheckpointError                   exit 2   a checkpoint is missing/corrupt, or a path is misused
    ├── DistributedError                  exit 2   torchrun environment is inconsistent
    ├── AssetError(RuntimeError)          exit 2   an offline asset cannot be obtained or verified
    └── NonFiniteLossError                exit 4   the training loss became NaN/Inf
    (out of memory: torch's own error)    exit 3   see :func:`is_oom` / :func:`friendly_oom`

**One CLI wrapper.** :func:`run_cli` runs a CLI body and maps the above to one ``error: ...``
(``config error: ...`` for :class:`ConfigError`) line on stderr and the exit status; a missing file
(``FileNotFoundError``) is exit 2 too. Anything else is a bug and keeps its traceback. Every
``python -m speeder_fast.*`` entry point goes through it.

* :func:`friendly_oom` turns a CUDA out-of-memory exception into an actionable message that names
  the config keys to change and their current values.
* :func:`check_finite` / :class:`NonFiniteMonitor` stop a run whose loss became NaN/Inf, naming the
  step. ``check_finite`` forces a host sync (it reads the value), so call it at log intervals, not
  every step; ``NonFiniteMonitor.update`` is sync-free and can run every step.

This module imports torch lazily, so :mod:`speeder_fast.config` can use its classes cheaply.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Callable


class SpeederError(Exception):
    """Base class of speeder_fast's own errors (message is meant for the user, not a traceback).

    Attributes:
        exit_code: the status a CLI exits with (:func:`run_cli`).
        prefix: how the CLI line starts (``error:``).
    """

    exit_code: int = 2
    prefix: str = "error"


class ConfigError(SpeederError, ValueError):
    """A configuration problem, with the offending key in the message."""

    prefix = "config error"


class UsageError(SpeederError, ValueError):
    """A command-line argument is invalid (names the flag and the accepted values)."""


class DataError(SpeederError, ValueError):
    """The data cannot be used as configured (names the config key or the count of users/items affected)."""


class DataFormatError(DataError):
    """An input file is malformed; the message names the file, line and field."""


class CatalogueTooSmallError(DataError):
    """Some user has fewer never-interacted items than the negatives requested (``data.n_candidates``)."""


class CheckpointError(SpeederError):
    """A checkpoint is missing, incomplete or corrupt, a state cannot be stored, or a run would write
    into a checkpoint; names the file."""


class DistributedError(SpeederError):
    """The distributed environment (torchrun variables, process group) is inconsistent."""


class AssetError(SpeederError, RuntimeError):
    """An offline asset could not be obtained or failed verification."""


class NonFiniteLossError(SpeederError):
    """The training loss became NaN or infinite.

    Attributes:
        step: the (first known) optimizer step whose loss was not finite.
        value: the offending loss value (``nan``/``inf``/``-inf``), when known.
    """

    exit_code = 4

    def __init__(self, step: int, value: float | None = None, hint: str = "") -> None:
        self.step = int(step)
        self.value = value
        shown = "non-finite" if value is None else repr(value)
        msg = f"training loss is {shown} at step {self.step}"
        msg += "; " + (hint or "try a lower learning rate, train.grad_clip > 0, or precision bf16/fp32 "
                       "instead of fp16-like settings; resume from the last checkpoint with --resume")
        super().__init__(msg)


#: exit statuses of every CLI (docs/production.md "Failures and messages")
EXIT_OK, EXIT_BAD_INPUT, EXIT_OOM, EXIT_NONFINITE = 0, 2, 3, 4


def run_cli(body: Callable[[], int | None], config: Callable[[], Any] | None = None) -> int:
    """Run a CLI body and apply the error contract; returns the exit status.

    Args:
        body: the CLI's work; returns its status (None = 0).
        config: returns the resolved config (or None) for the out-of-memory advice.

    Returns:
        ``body()``'s status (0 when stdout's reader closed the pipe, as in ``... | head``); 2 after a :class:`SpeederError` (its ``exit_code``: 4 for
        :class:`NonFiniteLossError`) or a ``FileNotFoundError``; 3 after an out-of-memory error. The
        message is one ``error: ...`` line on stderr (``config error: ...`` for a config problem; the
        OOM advice spans a few lines), never a traceback. Other exceptions propagate (bugs).
    """
    try:
        return int(body() or 0)
    except BrokenPipeError:  # the reader went away (``... | head``): not an error of ours
        try:  # keep the interpreter's final flush of stdout from raising again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except SpeederError as e:
        print(f"{e.prefix}: {e}", file=sys.stderr)
        return int(e.exit_code)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (RuntimeError, MemoryError) as e:
        if is_oom(e):
            cfg = None
            if config is not None:
                try:
                    cfg = config()
                except Exception:  # noqa: BLE001 - advice without values is better than a traceback
                    cfg = None
            print(friendly_oom(e, cfg), file=sys.stderr)
            return EXIT_OOM
        raise


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA (or other accelerator) out-of-memory error (or a host ``MemoryError``)."""
    import torch

    if isinstance(exc, MemoryError):
        return True
    oom_types = tuple(
        t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t
    )
    if oom_types and isinstance(exc, oom_types):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return default
    return obj


def friendly_oom(exc: BaseException, cfg: Any) -> str:
    """An actionable message for an out-of-memory error, naming config keys and current values.

    Args:
        exc: the exception (any; the first line of its message is quoted).
        cfg: the resolved :class:`speeder_fast.config.Config` (read-only; missing sections tolerated).

    Returns:
        A multi-line message suggesting, in order of least impact on results: smaller micro-batches
        with more accumulation (same effective batch), a token budget per micro-batch, gradient
        checkpointing, then lower precision (bf16 / nf4 QLoRA). Suggestions that are already in
        effect are left out.
    """
    import torch

    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    bs = int(_get(cfg, "train.batch_size", 1) or 1)
    accum = int(_get(cfg, "train.grad_accum", 1) or 1)
    max_tok = int(_get(cfg, "train.max_tokens_per_batch", 0) or 0)
    gc = bool(_get(cfg, "model.gradient_checkpointing", False))
    prec = str(_get(cfg, "model.precision", "fp32"))
    hist = _get(cfg, "data.max_history", None)
    paradigm = _get(cfg, "prompt.paradigm", None)
    lines = [f"out of memory: {first}"]
    cur = (f"current: train.batch_size={bs}, train.grad_accum={accum}, train.max_tokens_per_batch={max_tok}, "
           f"model.gradient_checkpointing={str(gc).lower()}, model.precision={prec}")
    if hist is not None:
        cur += f", data.max_history={hist}"
    if paradigm is not None:
        cur += f", prompt.paradigm={paradigm}"
    lines.append(cur)
    tips = []
    if bs > 1:
        nb, na = bs // 2, accum * 2
        same = "same effective batch" if nb * na == bs * accum else f"effective batch {nb * na} instead of {bs * accum}"
        tips.append(f"--set train.batch_size={nb} --set train.grad_accum={na}  ({same})")
    if max_tok > 0:
        tips.append(f"--set train.max_tokens_per_batch={max(1, max_tok // 2)}")
    else:
        tips.append("--set train.max_tokens_per_batch=N  (bound each micro-batch by tokens; long prompts "
                    "no longer blow up a batch)")
    if not gc:
        tips.append("--set model.gradient_checkpointing=true  (recompute activations in backward: slower steps, "
                    "far less activation memory)")
    if prec == "fp32":
        tips.append("--set model.precision=bf16  (or nf4 for a 4-bit QLoRA base)")
    elif prec == "bf16":
        tips.append("--set model.precision=nf4  (4-bit NF4 QLoRA base; needs bitsandbytes)")
    if bs == 1 and max_tok == 0 and paradigm == "verbose":
        tips.append("--set prompt.description_tokens=64  (verbose prompts are the longest)")
    if bs == 1 and hist is not None and int(hist) > 5:
        tips.append(f"--set data.max_history={max(1, int(hist) // 2)}  (changes the task: shorter histories)")
    lines.append("try one of:")
    lines += [f"  {t}" for t in tips]
    if torch.cuda.is_available():
        try:
            free, total = torch.cuda.mem_get_info()
            peak = torch.cuda.max_memory_allocated()
            lines.append(f"GPU memory: peak allocated {peak / 2**30:.2f} GiB, free {free / 2**30:.2f} / "
                         f"{total / 2**30:.2f} GiB")
        except Exception:  # pragma: no cover - diagnostics must never raise
            pass
    return "\n".join(lines)


def check_finite(loss: Any, step: int) -> None:
    """Raise :class:`NonFiniteLossError` naming ``step`` if ``loss`` is NaN or infinite.

    This reads the value on the host, i.e. it synchronises with the GPU: call it where the loop
    already syncs (at ``train.log_every`` intervals, on the logged loss), not every step. For a
    per-step check without syncs use :class:`NonFiniteMonitor`.
    """
    import torch

    if isinstance(loss, torch.Tensor):
        value = float(loss.detach().float().sum().item()) if loss.numel() else 0.0
    else:
        value = float(loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(step, value)


class NonFiniteMonitor:
    """Sync-free NaN/Inf watch: ``update`` every step on the device, ``check`` at log intervals.

    ``update`` records, with device-side ops only, the first step whose loss was not finite; ``check``
    does one host sync and raises :class:`NonFiniteLossError` naming that step.

    Example::

        mon = NonFiniteMonitor(device)
        for step ...:
            loss = ...
            mon.update(loss, step)          # no host sync
            if step % cfg.train.log_every == 0:
                mon.check()                 # one sync, raises naming the first bad step
    """

    def __init__(self, device: Any = "cpu") -> None:
        import torch

        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self._bad_value = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, loss: Any, step: int) -> None:
        """Record ``step`` if ``loss`` is non-finite and no earlier bad step was recorded."""
        import torch

        val = loss.detach().float().sum()
        if val.device != self._first_bad.device:
            val = val.to(self._first_bad.device, non_blocking=True)
        new = (~torch.isfinite(val)) & (self._first_bad < 0)
        self._first_bad = torch.where(new, torch.full_like(self._first_bad, int(step)), self._first_bad)
        self._bad_value = torch.where(new, val, self._bad_value)

    def check(self) -> None:
        """Raise :class:`NonFiniteLossError` if any updated loss was non-finite (one host sync)."""
        step = int(self._first_bad.item())
        if step >= 0:
            raise NonFiniteLossError(step, float(self._bad_value.item()))

    def reset(self) -> None:
        self._first_bad.fill_(-1)
        self._bad_value.zero_()
