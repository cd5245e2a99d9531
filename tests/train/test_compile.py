"""train.compile=true trains as eager does: a few steps from equal weights end at equal weights and losses (within
a tolerance for fused kernels)."""

from __future__ import annotations

import torch

STEPS = 3


def test_compiled_steps_match_eager_steps(make_trainer):
    """TRM (no encoder: the smallest graph to compile), staggered halting; the compiled core must follow the eager
    one step for step: same halting decisions, losses and weights within 1e-4."""
    torch.manual_seed(0)
    eager = make_trainer("trm", "train.compile=false", "act.halt_exploration_prob=0.5")
    torch.manual_seed(0)
    compiled = make_trainer("trm", "train.compile=true", "act.halt_exploration_prob=0.5")
    compiled.model.load_state_dict(eager.model.state_dict())
    for _ in range(STEPS):
        ev_e, m_e = eager.train_step()
        ev_c, m_c = compiled.train_step()
        assert torch.equal(ev_e.halted, ev_c.halted)
        torch.testing.assert_close(m_c["loss"], m_e["loss"], rtol=1e-4, atol=1e-4)
    for (name, p_e), p_c in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-4, msg=name)
    assert compiled.model.core._compiled_call_impl is not None  # the compiled path did run
