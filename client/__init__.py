"""Python client for rnnserve: numpy in, typed results out; blocking (`Client`) or asyncio
(`AsyncClient`)."""

from rnnserve.client.aio import AsyncClient, AsyncSession
from rnnserve.client.connection import TLS, RetryPolicy
from rnnserve.client.results import (
    ClassScore,
    ModelInfo,
    Output,
    OutputInfo,
    OutputMode,
    Prediction,
    SessionInfo,
    StepResult,
)
from rnnserve.client.sync import Client, Session

__all__ = [
    "TLS",
    "AsyncClient",
    "AsyncSession",
    "ClassScore",
    "Client",
    "ModelInfo",
    "Output",
    "OutputInfo",
    "OutputMode",
    "Prediction",
    "RetryPolicy",
    "Session",
    "SessionInfo",
    "StepResult",
]
