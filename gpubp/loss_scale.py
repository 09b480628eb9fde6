"""The fp16 dynamic loss scaler (issue 12): one small float64 device array per fp16 model, read and written by
the kernels of a train step, so that scaling needs no host synchronisation and survives graph capture.

Why: fp16 keeps 5 exponent bits, so gradients below 2⁻²⁴ flush to zero when δ is stored in fp16. The loss
gradient δ_out is multiplied by a scale S before it is stored, every δ and every dW, db downstream carry the
factor S, and the gradients are divided by S (in float32) before the update. S is as large as it can be without
overflow, found as PyTorch's GradScaler finds it:
    an overflow (a non-finite gradient): the step is skipped, S ← S · BACKOFF, the count of good steps restarts
    GROWTH_INTERVAL good steps in a row:  S ← S · GROWTH

Layout (float64):
    scaler[SCALE]            the current scale S
    scaler[GOOD]             good steps since the last change of S
    scaler[OVERFLOWS]        steps skipped for overflow since the model was made (or loaded)
    scaler[GROWTH_INTERVAL], scaler[GROWTH], scaler[BACKOFF]   the rule's settings

A step, in stream order (Sequential._step_ops; gpubp/guard.py has the rest):
    loss_grad           δ_out = S · ∂L/∂Z_out, stored in fp16
    unscale_gradients   (in place of guard_loss) grads /= S; a non-finite one sets guard[FAULT] = OVERFLOW
    <optimizer>         skips the update, as for any fault (its own step count, Adam's t, does not move)
    update_scale        OVERFLOW: cleared, guard[STEP] += 1, S backs off; no fault: GOOD += 1 and S grows every
                        GROWTH_INTERVAL good steps
    record_step         records the step's loss, as for any step: an overflow step is a train step taken (it
                        counts in net.steps, its loss is known and kept) whose update was skipped
A real fault (a non-finite loss, or parameters) is not an overflow: it stays set and the host reports it.
"""
import numpy as np

SCALE, GOOD, OVERFLOWS, GROWTH_INTERVAL, GROWTH, BACKOFF = range(6)
SIZE = 6

# PyTorch's GradScaler defaults
INIT_SCALE = 2.0 ** 16
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
INTERVAL = 2000
MAX_SCALE = 2.0 ** 100   # S never grows past this: a huge S would overflow float32 in δ_out·S for any δ


def fresh(scale=INIT_SCALE, good=0, overflows=0, growth_interval=INTERVAL, growth=GROWTH_FACTOR,
          backoff=BACKOFF_FACTOR):
    """The scaler array as the host writes it (a new model, or a loaded one)."""
    out = np.zeros(SIZE, np.float64)
    out[SCALE], out[GOOD], out[OVERFLOWS] = scale, good, overflows
    out[GROWTH_INTERVAL], out[GROWTH], out[BACKOFF] = growth_interval, growth, backoff
    return out


def update(scaler, overflow):
    """The rule on a host copy (the numpy backend's update_scale, and the tests' reference)."""
    if overflow:
        scaler[SCALE] *= scaler[BACKOFF]
        scaler[GOOD] = 0
        scaler[OVERFLOWS] += 1
    else:
        scaler[GOOD] += 1
        if scaler[GOOD] >= scaler[GROWTH_INTERVAL]:
            scaler[SCALE] = min(scaler[SCALE] * scaler[GROWTH], MAX_SCALE)
            scaler[GOOD] = 0
