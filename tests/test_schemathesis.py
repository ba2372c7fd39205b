"""Schemathesis against the app's own OpenAPI document: every operation, every default check.

The app runs in-process on Schemathesis's ASGI transport (a thread with its own event
loop; the lifespan starts on the first call and stops when this module ends), against
this run's real PostgreSQL, Redis and RabbitMQ. One test per operation, and a stateful
workflow that follows the document's links. Generation is derandomized, so a run is
repeatable; `FUZZ_EXAMPLES` (default 10 per operation and phase) is what `make fuzz`
raises for a longer run.
"""

from __future__ import annotations

import itertools
import os
import string
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import Case
from schemathesis.config import SchemathesisConfig
from schemathesis.core.parameters import ParameterLocation
from schemathesis.python import asgi
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.configs import Settings
from api.main import create_app
from tests.conftest import run_settings
from tests.factories import PASSWORD, make_user, order_payload

# The app runs on a thread of this process, and its retry jitter (relay, sweeper, reconnects)
# draws from the global `random` module while Hypothesis generates; Hypothesis's guard
# against strategies that use `random` cannot tell the two apart. Generation itself is
# derandomized and does not read that state.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10"))
SEED = 20_261_122
STATEFUL_STEPS = 10

# email-validator (behind EmailStr) refuses the special-use names of RFC 6761 as undeliverable;
# JSON Schema's `email` format allows them, so generated addresses avoid exactly those.
SPECIAL_USE_SUFFIXES = (".arpa", ".invalid", ".local", ".localhost", ".onion", ".test")
schemathesis.openapi.format(
    "email", st.emails().filter(lambda email: not email.lower().endswith(SPECIAL_USE_SUFFIXES))
)

app = create_app(
    run_settings(REDIS_KEY_PREFIX=f"{run_settings().REDIS_KEY_PREFIX}fuzz-{uuid.uuid4().hex[:8]}:")
)
config = SchemathesisConfig.from_dict(
    {
        "seed": SEED,
        "generation": {"max-examples": EXAMPLES, "deterministic": True, "database": "none"},
        "checks": {
            # Schemathesis's default list plus 412: a schema-valid `If-Match` that names
            # another version fails its precondition (RFC 9110 §13.1.1).
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "412", "429", "5xx"]
            },
        },
    }
)
# FastAPI serves exactly `app.openapi()` at /openapi.json; reading it directly keeps module
# import from starting the app before the run's database exists. (The lazy loader,
# `schemathesis.pytest.from_fixture`, fails on pytest 9: it sets the removed `Node._nodeid`.)
schema = schemathesis.openapi.from_dict(app.openapi(), config=config)
schema.app = app

ADMIN_OPERATIONS = frozenset({("PATCH", "/v1/orders/{order_id}")})


@dataclass(frozen=True)
class Seed:
    """Accounts and data the fuzzed requests run as and point at."""

    user_headers: dict[str, str]
    admin_headers: dict[str, str]
    cursor: str


@pytest.fixture(scope="module")
async def admin_headers(
    database: str, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> dict[str, str]:
    return (await make_user(sessionmaker, settings, role="admin")).headers


def new_account() -> dict[str, str]:
    """Register and log in a fresh user through the API; its bearer header."""
    with asgi.get_client(app) as client:
        email = f"fuzz-{uuid.uuid4().hex[:12]}@example.com"
        registered = client.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
        assert registered.status_code == 201, registered.text
        login = client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert login.status_code == 200, login.text
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


@pytest.fixture(scope="module")
def seed(admin_headers: dict[str, str]) -> Iterator[Seed]:
    """A user with orders and a real page cursor, the admin, and the app started."""
    user_headers = new_account()
    with asgi.get_client(app) as client:
        for _ in range(2):
            created = client.post("/v1/orders", json=order_payload(), headers=user_headers)
            assert created.status_code == 201, created.text
        page = client.get("/v1/orders", params={"limit": 1}, headers=user_headers).json()
    yield Seed(user_headers=user_headers, admin_headers=admin_headers, cursor=page["next_cursor"])
    asgi.shutdown_lifespans()


_unique = itertools.count()
EMAIL_FIELDS = ("email", "username")  # `username` is the email in the OAuth2 token form


def _is_positive(case: Case, location: ParameterLocation) -> bool:
    component = case.meta.components.get(location) if case.meta else None
    return component is not None and component.mode.is_positive


def make_realistic(case: Case, seed: Seed) -> None:
    """Adjust generated values the way a real client's differ from schema-valid noise.

    Each adjustment below names why. Negative values stay as generated (the server
    must reject them); Schemathesis re-checks whether a changed part is still valid.
    """
    if _is_positive(case, ParameterLocation.QUERY):
        use_a_server_issued_cursor(case, seed)
    if _is_positive(case, ParameterLocation.HEADER):
        use_a_fresh_idempotency_key(case)
    if _is_positive(case, ParameterLocation.BODY):
        case.body = integers_as_integers(case.body)
        register_a_fresh_email(case)
    lower_case_email_domains(case)


def use_a_server_issued_cursor(case: Case, seed: Seed) -> None:
    """A page cursor is opaque and checksummed: a client only sends one it was given."""
    if case.query and "cursor" in case.query:
        case.query["cursor"] = seed.cursor


def use_a_fresh_idempotency_key(case: Case) -> None:
    """A key reused with another body is refused by design (SPEC §5): one key per order."""
    if case.headers and "Idempotency-Key" in case.headers:
        key = f"{next(_unique)}:{case.headers['Idempotency-Key']}"
        case.headers["Idempotency-Key"] = key[:255]


def register_a_fresh_email(case: Case) -> None:
    """An address registers once (409 after that); each generated account gets its own."""
    if case.operation.path == "/v1/auth/register" and isinstance(case.body, dict):
        local, _, domain = str(case.body["email"]).rpartition("@")
        case.body["email"] = f"{next(_unique)}.{local}"[:64] + f"@{domain}"


def lower_case_email_domains(case: Case) -> None:
    """Domain names are case-insensitive, IDNA prefixes included (RFC 5890 §2.3.2.1).

    Schemathesis's `email` format check refuses an upper-case `XN--` label that
    email-validator rightly reads as `xn--`; written in lower case, both agree.
    """
    if not isinstance(case.body, dict):
        return
    for field in EMAIL_FIELDS:
        value = case.body.get(field)
        if isinstance(value, str) and "@" in value:
            local, _, domain = value.rpartition("@")
            case.body[field] = f"{local}@{domain.translate(ASCII_LOWER)}"


ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def integers_as_integers(value: Any) -> Any:
    """`2.0` written as `2`: JSON Schema counts both as an integer, the API takes only the latter.

    Counts and minor units must be JSON integers (StrictInt): a price sent as `12.0` is
    more likely a unit mix-up than a number of cents, so it is refused on purpose.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: integers_as_integers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [integers_as_integers(item) for item in value]
    return value


def auth_headers(case: Case, seed: Seed, user_headers: dict[str, str]) -> dict[str, str]:
    admin = (case.operation.method.upper(), case.operation.path) in ADMIN_OPERATIONS
    return seed.admin_headers if admin else user_headers


@schema.parametrize()
def test_api_conforms_to_its_openapi_document(case: Case, seed: Seed) -> None:
    make_realistic(case, seed)
    case.call_and_validate(headers=auth_headers(case, seed, seed.user_headers))


class OrderWorkflow(schema.as_state_machine()):  # type: ignore[misc]
    """Sequences of calls following the document's links (create, read, cancel, move).

    Each sequence runs as a user of its own, so what it finds (its orders, their
    states) depends on its own steps only and Hypothesis can replay it.
    """

    seed: Seed
    user_headers: dict[str, str]

    def setup(self) -> None:
        self.user_headers = new_account()

    def before_call(self, case: Case) -> None:
        make_realistic(case, self.seed)

    def get_call_kwargs(self, case: Case) -> dict[str, Any]:
        return {"headers": auth_headers(case, self.seed, self.user_headers)}


@pytest.fixture(scope="module")
def workflow_seed(seed: Seed) -> None:
    OrderWorkflow.seed = seed


TestOrderWorkflow = pytest.mark.usefixtures("workflow_seed")(OrderWorkflow.TestCase)
TestOrderWorkflow.settings = hypothesis.settings(
    max_examples=max(1, EXAMPLES // 2),
    phases=[hypothesis.Phase.generate],  # as Schemathesis runs state machines itself
    stateful_step_count=STATEFUL_STEPS,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
