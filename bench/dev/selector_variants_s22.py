"""Dev variants of the default (staged) selector with fewer or shallower probe passes (issue 11 item 2).

    python3 bench/selector_dev.py RUN_DIR kvfuse,st1,st2,half,q3 --answers --variants bench/dev/selector_variants_s22.py

st1 / st2: one or two stages instead of three; half / q3: each repair pass runs only the first
half / three quarters of the layers. Measured 2026-11-30 and not kept (docs/selectors.md, "Fewer or
shallower probe passes"). Registers the names in SELECTORS on import; not a product path.
"""
from unittest.mock import patch

from kvfuse.runtime import fusion
from kvfuse.runtime.model import LoadedModel
from kvfuse.runtime.selectors import SELECTORS, kvfuse_staged


def stages(n):
    def select(ctx, budget):
        with patch.object(kvfuse_staged, "STAGES", n):
            return kvfuse_staged.select(ctx, budget)
    select.reads_stored = False
    return select


SELECTORS["st1"] = stages(1)
SELECTORS["st2"] = stages(2)


# Shallow repairs: each stage's repair pass runs only the first `share` of the layers (its relevance is
# averaged over those); the final recompute runs every pick through every layer as before.
def _model_of(repairer):
    for cell in repairer.__closure__ or ():
        if isinstance(cell.cell_contents, LoadedModel):
            return cell.cell_contents.model
    raise RuntimeError("no model in the repairer's closure")


def shallow(share):
    def select(ctx, budget):
        inner, real = ctx.repairer, fusion.recompute
        model = _model_of(inner)
        depth = max(1, round(share * model.config.num_hidden_layers))

        def rec(*a, **k):
            with fusion.stop_after_layer(model, depth):
                return real(*a, **k)

        def repairer(new, reduce=None):
            with patch.object(fusion, "recompute", rec):
                return inner(new, reduce)
        with patch.object(ctx, "repairer", repairer):
            return kvfuse_staged.select(ctx, budget)
    select.reads_stored = False
    return select


SELECTORS["half"] = shallow(0.5)
SELECTORS["q3"] = shallow(0.75)
