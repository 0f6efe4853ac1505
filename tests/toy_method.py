"""A toy compression method: what adding one takes is this file and one ``register(TOY)``.

It keeps the input channels whose delta holds the largest single entry in fp16, and quantizes the rest on a
symmetric grid whatever the config asks.
"""

from meswitch.compression.methods import Method


def peak_scores(delta, s, spec, scores):
    """Each input channel's largest absolute delta."""
    return delta.abs().amax(dim=0)


TOY = Method(
    "toy",
    "salient by peak delta, on a symmetric grid",
    salience=peak_scores,
    grid={"symmetric": True},
    uses_calibration=False,
    marker="v-",
)
