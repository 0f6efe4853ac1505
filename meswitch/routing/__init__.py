"""Model-level routing: send each query to the expert of its domain.

Two backends behind one ``Router``: the paper's multiple-choice LLM router (``mcq``, optionally
fine-tuned) and a sentence-embedding classifier (``embedding``). ``train_router`` builds a router
artifact from expert folders; ``load_router`` loads one for serving.
"""

from meswitch.routing.artifact import load_router
from meswitch.routing.dataset import (
    DomainSpec,
    Example,
    RoutingDataError,
    build_routing_data,
    find_experts,
    read_labelled,
)
from meswitch.routing.evaluate import RouterEval, evaluate_router
from meswitch.routing.router import Router, RouteResult
from meswitch.routing.train import RouterJob, train_router

__all__ = [
    "DomainSpec",
    "Example",
    "RouteResult",
    "Router",
    "RouterEval",
    "RouterJob",
    "RoutingDataError",
    "build_routing_data",
    "evaluate_router",
    "find_experts",
    "load_router",
    "read_labelled",
    "train_router",
]
