"""The classifier on real network, HTTP and Python errors; user rules; explicit markers; serialization."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable

import httpx
import pytest
import requests
from airflow.sdk.exceptions import AirflowException, AirflowSkipException

from airflow_selfheal.exceptions import DeadLetterCeilingExceeded, PermanentError, TransientError
from airflow_selfheal.healing.classify import DEFAULT_CLASSIFIER, PERMANENT, TRANSIENT, ErrorClassifier


def caught(action: Callable[[], object]) -> BaseException:
    """Run ``action`` and return what it raised (the test fails if it raises nothing)."""
    try:
        action()
    except BaseException as error:
        return error
    raise AssertionError("expected an exception")


def wrapped(outer: Callable[[], BaseException], inner: BaseException) -> BaseException:
    """``raise outer() from inner``, really raised so the chain is what Python builds."""

    def action() -> None:
        raise outer() from inner

    return caught(action)


# --- network and Python built-ins -------------------------------------------------------------------------------


def test_refused_connection_is_transient(closed_port: int) -> None:
    error = caught(lambda: socket.create_connection(("127.0.0.1", closed_port), timeout=2))
    assert isinstance(error, ConnectionRefusedError)
    assert DEFAULT_CLASSIFIER.classify(error) == TRANSIENT
    assert (
        DEFAULT_CLASSIFIER.explain(error)
        == "ConnectionRefusedError is transient: network connection failed or was reset"
    )


def test_socket_read_timeout_is_transient(silent_port: int) -> None:
    with socket.create_connection(("127.0.0.1", silent_port), timeout=2) as client:
        client.settimeout(0.05)
        error = caught(lambda: client.recv(1))
    assert isinstance(error, socket.timeout)
    assert DEFAULT_CLASSIFIER.is_transient(error)


def test_asyncio_timeout_is_transient() -> None:
    error = caught(lambda: asyncio.run(asyncio.wait_for(asyncio.sleep(5), timeout=0.01)))
    assert isinstance(error, asyncio.TimeoutError)
    assert DEFAULT_CLASSIFIER.is_transient(error)


@pytest.mark.parametrize(
    "action",
    [
        lambda: dict[str, int]()["missing"],
        lambda: int("not a number"),
        lambda: len(42),  # type: ignore[arg-type]
        lambda: json.loads("{broken"),
        lambda: object().attribute,  # type: ignore[attr-defined]
        lambda: 1 / 0,
        lambda: open("/nonexistent/selfheal/file"),  # noqa: SIM115
    ],
    ids=["KeyError", "ValueError", "TypeError", "JSONDecodeError", "AttributeError", "ZeroDivision", "FileNotFound"],
)
def test_programming_and_data_errors_are_permanent(action: Callable[[], object]) -> None:
    error = caught(action)
    assert DEFAULT_CLASSIFIER.classify(error) == PERMANENT
    assert "bug or bad data" in DEFAULT_CLASSIFIER.explain(error)


def test_unknown_errors_are_permanent_so_bugs_fail_fast() -> None:
    error = caught(lambda: exec("raise RuntimeError('something odd')"))
    assert DEFAULT_CLASSIFIER.classify(error) == PERMANENT
    assert "unknown errors are permanent" in DEFAULT_CLASSIFIER.explain(error)


def test_wrapper_without_an_opinion_is_classified_by_what_it_wraps(closed_port: int) -> None:
    refused = caught(lambda: socket.create_connection(("127.0.0.1", closed_port), timeout=2))
    error = wrapped(lambda: AirflowException("upstream call failed"), refused)
    assert DEFAULT_CLASSIFIER.classify(error) == TRANSIENT
    assert "via wrapped builtins.ConnectionRefusedError" in DEFAULT_CLASSIFIER.explain(error)


def test_a_bug_raised_while_handling_a_network_error_stays_a_bug(closed_port: int) -> None:
    def handler_with_bug() -> None:
        try:
            socket.create_connection(("127.0.0.1", closed_port), timeout=2)
        except OSError:
            dict[str, int]()["oops"]

    assert DEFAULT_CLASSIFIER.classify(caught(handler_with_bug)) == PERMANENT


# --- HTTP (httpx and requests against a real local server) --------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        *[(status, TRANSIENT) for status in (408, 429, 500, 502, 503, 504)],
        *[(status, PERMANENT) for status in (400, 401, 403, 404, 422)],
    ],
)
def test_http_status_errors(http_base_url: str, status: int, verdict: str) -> None:
    httpx_error = caught(lambda: httpx.get(f"{http_base_url}/{status}", timeout=5).raise_for_status())
    requests_error = caught(lambda: requests.get(f"{http_base_url}/{status}", timeout=5).raise_for_status())
    assert isinstance(httpx_error, httpx.HTTPStatusError)
    assert isinstance(requests_error, requests.HTTPError)
    assert DEFAULT_CLASSIFIER.classify(httpx_error) == verdict
    assert DEFAULT_CLASSIFIER.classify(requests_error) == verdict
    assert f"HTTP {status}" in DEFAULT_CLASSIFIER.explain(httpx_error)


def test_http_transport_failures_are_transient(closed_port: int, silent_port: int) -> None:
    errors = [
        caught(lambda: httpx.get(f"http://127.0.0.1:{closed_port}/", timeout=2)),
        caught(lambda: requests.get(f"http://127.0.0.1:{closed_port}/", timeout=2)),
        caught(lambda: httpx.get(f"http://127.0.0.1:{silent_port}/", timeout=0.1)),
        caught(lambda: requests.get(f"http://127.0.0.1:{silent_port}/", timeout=0.1)),
    ]
    assert [type(e).__name__ for e in errors] == ["ConnectError", "ConnectionError", "ReadTimeout", "ReadTimeout"]
    assert [DEFAULT_CLASSIFIER.classify(e) for e in errors] == [TRANSIENT] * 4


def test_malformed_request_urls_are_permanent() -> None:
    assert DEFAULT_CLASSIFIER.classify(caught(lambda: httpx.get("ftp://example.invalid/x"))) == PERMANENT
    assert DEFAULT_CLASSIFIER.classify(caught(lambda: requests.get("no-scheme.invalid"))) == PERMANENT


def test_airflow_http_style_wrapper_of_a_503(http_base_url: str) -> None:
    service_unavailable = caught(lambda: requests.get(f"{http_base_url}/503", timeout=5).raise_for_status())
    error = wrapped(lambda: AirflowException("503:Service Unavailable"), service_unavailable)
    assert DEFAULT_CLASSIFIER.classify(error) == TRANSIENT


# --- explicit markers ---------------------------------------------------------------------------------------------


def test_explicit_markers_and_their_subclasses() -> None:
    assert DEFAULT_CLASSIFIER.classify(TransientError("upstream 503")) == TRANSIENT
    assert DEFAULT_CLASSIFIER.classify(PermanentError("contract broken")) == PERMANENT
    assert DEFAULT_CLASSIFIER.classify(DeadLetterCeilingExceeded("too many")) == PERMANENT
    assert DEFAULT_CLASSIFIER.explain(TransientError("x")) == "TransientError is transient: raised as TransientError"


def test_marker_found_through_cause_and_context() -> None:
    # raise TransientError(...) from e: the marker says what the built-ins would not (ValueError is permanent).
    assert DEFAULT_CLASSIFIER.classify(wrapped(lambda: TransientError("retry me"), ValueError("x"))) == TRANSIENT

    def implicit() -> None:
        try:
            raise PermanentError("bad contract")
        except PermanentError:
            raise RuntimeError("cleanup failed")  # noqa: B904 (deliberately implicit: only __context__ is set)

    error = caught(implicit)
    assert isinstance(error.__context__, PermanentError)
    assert DEFAULT_CLASSIFIER.classify(error) == PERMANENT
    assert "via wrapped airflow_selfheal.exceptions.PermanentError" in DEFAULT_CLASSIFIER.explain(error)
    # A marker beats a built-in opinion further up the chain.
    assert DEFAULT_CLASSIFIER.classify(wrapped(lambda: ValueError("parse"), TransientError("later"))) == TRANSIENT


def test_suppressed_context_is_not_followed() -> None:
    def suppressed() -> None:
        try:
            raise TransientError("flaky")
        except TransientError:
            raise RuntimeError("give up") from None

    assert DEFAULT_CLASSIFIER.classify(caught(suppressed)) == PERMANENT


# --- user rules ---------------------------------------------------------------------------------------------------


class VendorRateLimited(Exception):
    """Stands in for a vendor SDK's error."""


def test_user_rule_by_class_path_and_predicate() -> None:
    by_class = ErrorClassifier(transient=[VendorRateLimited])
    by_path = ErrorClassifier(transient=[f"{__name__}.VendorRateLimited"])
    by_predicate = ErrorClassifier(transient=[lambda e: "rate limit" in str(e)])
    error = VendorRateLimited("rate limit exceeded")
    assert DEFAULT_CLASSIFIER.classify(error) == PERMANENT
    for classifier in (by_class, by_path, by_predicate):
        assert classifier.classify(error) == TRANSIENT
    assert by_path.explain(error) == (
        f"VendorRateLimited is transient: user transient rule {__name__}.VendorRateLimited matched"
    )
    assert by_predicate.classify(VendorRateLimited("quota gone for the month")) == PERMANENT


def test_dotted_path_of_a_reexported_class_is_imported() -> None:
    # json.JSONDecodeError is defined in json.decoder: matching needs the import, not the class name.
    classifier = ErrorClassifier(transient=["json.JSONDecodeError"])
    assert classifier.classify(caught(lambda: json.loads("{"))) == TRANSIENT


def test_unimportable_path_never_matches_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    classifier = ErrorClassifier(transient=["no_such_vendor_sdk.errors.Flaky"])
    assert classifier.classify(ConnectionResetError()) == TRANSIENT  # built-ins still apply
    assert classifier.classify(VendorRateLimited()) == PERMANENT
    assert "cannot be imported" in caplog.text


def test_user_permanent_beats_everything_else(closed_port: int) -> None:
    refused = caught(lambda: socket.create_connection(("127.0.0.1", closed_port), timeout=2))
    classifier = ErrorClassifier(
        permanent=["builtins.ConnectionRefusedError", TransientError],
        transient=[ConnectionRefusedError],
    )
    assert classifier.classify(refused) == PERMANENT
    assert classifier.classify(TransientError("marked")) == PERMANENT
    assert ErrorClassifier(transient=[KeyError]).classify(KeyError("k")) == TRANSIENT  # beats the built-in


def test_user_rules_look_through_the_chain() -> None:
    classifier = ErrorClassifier(transient=[VendorRateLimited])
    assert classifier.classify(wrapped(lambda: AirflowException("vendor call"), VendorRateLimited())) == TRANSIENT


def test_failing_predicate_is_no_match(caplog: pytest.LogCaptureFixture) -> None:
    def broken(error: BaseException) -> bool:
        raise RuntimeError("predicate bug")

    assert ErrorClassifier(transient=[broken]).classify(ConnectionResetError()) == TRANSIENT
    assert ErrorClassifier(transient=[broken]).classify(VendorRateLimited()) == PERMANENT
    assert "broken raised" in caplog.text


def test_interrupts_and_airflow_signals_are_never_retried() -> None:
    everything = ErrorClassifier(transient=[BaseException, Exception])
    assert everything.classify(KeyboardInterrupt()) == PERMANENT
    assert everything.classify(asyncio.CancelledError()) == PERMANENT
    assert everything.classify(AirflowSkipException("skip")) == PERMANENT
    assert "control-flow signal" in everything.explain(AirflowSkipException("skip"))
    assert everything.classify(VendorRateLimited()) == TRANSIENT


# --- validation and serialization ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "named"),
    [
        ({"transient": "pkg.Error"}, TypeError, "transient must be a list"),
        ({"permanent": [42]}, TypeError, "permanent[0]"),
        ({"transient": [ValueError, "NoDots"]}, ValueError, "transient[1]"),
        ({"transient": [int]}, TypeError, "transient[0] must be an exception class"),
    ],
)
def test_bad_rules_name_the_argument(kwargs: dict, error: type[Exception], named: str) -> None:
    with pytest.raises(error, match=named.replace("[", r"\[")):
        ErrorClassifier(**kwargs)


def test_classify_rejects_non_exceptions() -> None:
    with pytest.raises(TypeError, match="error must be an exception"):
        DEFAULT_CLASSIFIER.classify("boom")  # type: ignore[arg-type]


def test_serialize_round_trips_through_json() -> None:
    classifier = ErrorClassifier(transient=[VendorRateLimited, "json.JSONDecodeError"], permanent=[ConnectionError])
    data = json.loads(json.dumps(classifier.serialize()))
    assert data == {
        "transient": [f"{__name__}.VendorRateLimited", "json.JSONDecodeError"],
        "permanent": ["builtins.ConnectionError"],
    }
    restored = ErrorClassifier.deserialize(data)
    assert restored == classifier
    for error in (VendorRateLimited(), caught(lambda: json.loads("{")), ConnectionResetError(), KeyError("k")):
        assert restored.classify(error) == classifier.classify(error)


def test_predicates_and_local_classes_cannot_serialize() -> None:
    def is_flaky(error: BaseException) -> bool:
        return "flaky" in str(error)

    class LocalError(Exception):
        pass

    with pytest.raises(ValueError, match=r"transient\[1\] \(.*is_flaky\) is a predicate"):
        ErrorClassifier(transient=[KeyError, is_flaky]).serialize()
    with pytest.raises(ValueError, match=r"permanent\[0\] .*defined inside a function"):
        ErrorClassifier(permanent=[LocalError]).serialize()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (["transient"], "data must be a dict"),
        ({"transient": [], "extra": 1}, "unknown keys"),
        ({"transient": "pkg.Error"}, r"data\['transient'\] must be a list"),
    ],
)
def test_deserialize_rejects_foreign_data(data: object, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        ErrorClassifier.deserialize(data)  # type: ignore[arg-type]
