"""The device-side guard of the training loop: one small float64 array per model that the kernels of a train step
read and write, so that a fault is caught, and a step's bookkeeping done, without the host looking.

Layout (float64; integers up to 2⁵³ are exact):

    guard[FAULT]        0: no fault; LOSS, GRADIENT, PARAMS, or STATE + k (optimizer state buffer k) went non-finite
    guard[FAULT_STEP]   the step (guard[STEP] at that time) that faulted
    guard[FAULT_INDEX]  the smallest flat index of a non-finite element in the faulty buffer (-1 for the loss)
    guard[SKIPPED]      steps skipped after the fault (their updates were not applied)
    guard[STEP]         good steps so far (the host sets it to net.steps when it resets the guard)
    guard[LOSS_SUM]     Σ loss · rows over the good steps since the last reset (fit's epoch loss)
    guard[CORRECT]      Σ correct predictions over the same steps (Keras-style running accuracy, see record_step)
    guard[ROWS]         Σ rows over the same steps
    guard[RING:]        the loss of good step s at RING + s % RING_SIZE (what a lazy loss of sync=False reads)

A step, in stream order (Sequential._step_ops):
    forward, loss, backward
    guard_loss        FAULT already set: SKIPPED += 1. Else a non-finite loss sets FAULT = LOSS, FAULT_STEP = STEP,
                      FAULT_INDEX = -1.
    <optimizer>       FAULT set: nothing. Else the gradients are checked and the update computed, all of it before
                      anything is written, and the first of these faults names the buffer: a non-finite gradient
                      (FAULT = GRADIENT), an update that would leave a non-finite parameter (PARAMS) or state
                      value (STATE + k); FAULT_STEP = STEP and FAULT_INDEX with it, nothing written. Else the
                      update is applied, the optimizer's step count and guard[STEP] go up by one.
    record_step       FAULT set: nothing. Else LOSS_SUM, CORRECT, ROWS and the loss ring are updated.
The gradient check is part of the update (issue 11): on a GPU its check pass reads every gradient anyway, so the
step makes no pass over the gradients of its own (an fp16 step's unscale_gradients still makes one: it writes
them).
So once a fault is set, parameters and optimizer state stay those of the last good step until the host reads the
guard (once per `check_every` steps) and resets it.
"""
import numpy as np

FAULT, FAULT_STEP, FAULT_INDEX, SKIPPED, STEP, LOSS_SUM, CORRECT, ROWS = range(8)
RING = 8
RING_SIZE = 1024
SIZE = RING + RING_SIZE

# fault codes. OVERFLOW is the fp16 loss scaler's (gpubp/loss_scale.py): set by unscale_gradients, so the update
# and record_step skip the step as for any fault, and cleared by update_scale in the same step; the host never
# sees it.
NONE, LOSS, GRADIENT, PARAMS, STATE = 0, 1, 2, 3, 4
OVERFLOW = -1


def fresh(steps):
    """The guard's first RING entries as the host resets them: no fault, STEP = steps, sums zero."""
    head = np.zeros(RING, np.float64)
    head[FAULT_INDEX] = -1
    head[STEP] = steps
    return head


class StepFault(FloatingPointError):
    """A FloatingPointError that knows which train step faulted (`step`)."""

    def __init__(self, message, step):
        super().__init__(message)
        self.step = step


def fault(head, layout, layers, state_names):
    """The StepFault for a guard head whose FAULT is set."""
    return StepFault(fault_message(head, layout, layers, state_names), int(head[FAULT_STEP]))


def fault_message(head, layout, layers, state_names):
    """The FloatingPointError message for a guard head whose FAULT is set, naming the step and the layer."""
    code, step, index = int(head[FAULT]), int(head[FAULT_STEP]), int(head[FAULT_INDEX])
    skipped = int(head[SKIPPED])
    if code == LOSS:
        what = "the loss is not finite"
    else:
        layer = layout.layer_of(index)
        where = f"layer {layer} ({layers[layer]!r})" if layer is not None else f"flat element {index}"
        if code == GRADIENT:
            what = f"the gradient of {where} is not finite"
        elif code == PARAMS:
            what = f"the update made the parameters of {where} not finite"
        else:
            name = state_names[code - STATE] if 0 <= code - STATE < len(state_names) else f"#{code - STATE}"
            what = f"the update made the optimizer state {name!r} of {where} not finite"
    message = (f"train step {step}: {what}; the parameters and optimizer state were left as they were before "
               "this step; lower the learning rate or check the inputs")
    if skipped:
        message += f" ({skipped} later step{'s' if skipped > 1 else ''} of the same check interval skipped)"
    return message
