"""benchmark.common.pin_split against a small HTTP server that answers like a semi-PD server's
``/set_internal_state`` and ``/server_info`` (the split moves one poll after the request)."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
from pydantic import TypeAdapter
from sglang.srt.managers.io_struct import SetInternalStateReq

from benchmark.common import pin_split, release_to_slo

SET_STATE = TypeAdapter(SetInternalStateReq)  # FastAPI validates the body with this

SPLITS = [[40, 92], [56, 76], [72, 60], [88, 44], [104, 28]]


class _State:
    def __init__(self, accept: bool, moves: bool) -> None:
        self.accept, self.moves = accept, moves
        self.split, self.target, self.polls, self.asked = 2, 2, 0, []


def _serve(state: _State) -> http.server.HTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            # what SGLang's HTTP server does first: its request type refuses non-numbers
            args = SET_STATE.validate_python(req).server_args
            state.asked.append(args)
            share = args.get("semipd_prefill_sm_share")
            if share is not None:
                state.target = min(range(len(SPLITS)),
                                   key=lambda i: abs(SPLITS[i][0] / 132 - share))
            self._reply([state.accept])

        def do_GET(self) -> None:
            state.polls += 1
            if state.moves and state.polls > 1:
                state.split = state.target
            self._reply({"internal_states": [{"semipd": {"split": state.split,
                                                          "splits": SPLITS}}]})

        def log_message(self, *a) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("share,sms", [(0.3, [40, 92]), (0.62, [88, 44]), (0.8, [104, 28])])
def test_pins_and_waits_for_the_nearest_split(share, sms):
    state = _State(accept=True, moves=True)
    server = _serve(state)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert pin_split(url, share) == sms
        assert state.asked == [{"semipd_slo_policy": 0, "semipd_prefill_sm_share": share}]
        assert state.polls >= 2  # it waited for the move
    finally:
        server.shutdown()


def test_refusal_and_a_split_that_never_moves_are_errors():
    for state, match in ((_State(accept=False, moves=True), "refused"),
                         (_State(accept=True, moves=False), "not applied")):
        server = _serve(state)
        try:
            with pytest.raises(RuntimeError, match=match):
                pin_split(f"http://127.0.0.1:{server.server_address[1]}", 0.8, timeout_s=1.0)
        finally:
            server.shutdown()


def test_sglangs_request_type_refuses_what_our_old_policy_key_sent():
    """The H100 run that found it: a string value made SGLang answer 400 before any worker
    saw the request; the numeric switch passes."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        SET_STATE.validate_python({"server_args": {"semipd_partition_policy": "static"}})
    assert SET_STATE.validate_python({"server_args": {"semipd_slo_policy": 1}}).server_args \
        == {"semipd_slo_policy": 1}


def test_release_hands_the_split_back_to_the_slo_policy():
    for accept in (True, False):
        state = _State(accept=accept, moves=False)
        server = _serve(state)
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            if accept:
                release_to_slo(url)
            else:
                with pytest.raises(RuntimeError, match="refused"):
                    release_to_slo(url)
            assert state.asked == [{"semipd_slo_policy": 1}]
        finally:
            server.shutdown()
