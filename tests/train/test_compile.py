"""train.compile=true trains as eager does: a few steps from equal weights end at equal weights and losses (within
a tolerance for fused kernels).

Kept short (the issue asks at most about a minute): the smallest graph that still is the trainer's compiled step
(TRM, one H and one L cycle of one layer: no encoder, nothing unrolled twice), compiled once (asserted: no
recompile), two steps (the second runs on weights the optimizer changed, so a compiled core that held its own copy
of the weights would diverge there). On a cold inductor cache most of the time is the C++ compiler, once per fused
kernel; docs/performance.md records the measured cold and warm times.
"""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

STEPS = 2
SMALLEST = ("arch.H_cycles=1", "arch.L_cycles=1", "arch.L_layers=1", "act.halt_exploration_prob=0.5")


def test_compiled_steps_match_eager_steps(make_trainer):
    """The compiled core follows the eager one step for step (same halting decisions, losses and weights within
    1e-4) on the weights the trainer trains, and it is what ran (one graph compiled, none recompiled)."""
    torch.manual_seed(0)
    eager = make_trainer("trm", "train.compile=false", *SMALLEST)
    torch.manual_seed(0)
    compiled = make_trainer("trm", "train.compile=true", *SMALLEST)
    compiled.model.load_state_dict(eager.model.state_dict())
    start = {k: v.clone() for k, v in eager.model.state_dict().items()}
    graphs_before = counters["stats"]["unique_graphs"]
    for _ in range(STEPS):
        ev_e, m_e = eager.train_step()
        ev_c, m_c = compiled.train_step()
        assert torch.equal(ev_e.halted, ev_c.halted)
        torch.testing.assert_close(m_c["loss"], m_e["loss"], rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1  # the compiled core ran, compiled once
    moved = 0
    for (name, p_e), p_c in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-4, msg=name)
        moved += not torch.equal(p_e, start[name])
    assert moved > 0  # the steps trained: equal weights are not just the untouched initial ones
