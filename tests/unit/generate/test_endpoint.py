"""Pure tests of reading an OpenAI-compatible teacher's responses (plad_ray.generate.endpoint)."""

from plad_ray.generate.endpoint import read_response


def _response(finish_reason, **choice):
    return {"choices": [{"text": "cba", "finish_reason": finish_reason, **choice}], "usage": {"completion_tokens": 4}}


def test_finish_reasons_tell_eos_from_a_stop_string():
    # vLLM's server: stop_reason null (or the EOS id) for EOS, the string itself for a stop string.
    assert read_response(_response("stop", stop_reason=None))["finish_reason"] == "eos"
    assert read_response(_response("stop", stop_reason=2))["finish_reason"] == "eos"
    assert read_response(_response("stop", stop_reason="\n"), stop_configured=True)["finish_reason"] == "stop"
    assert read_response(_response("length", stop_reason=None))["finish_reason"] == "length"
    # A server without stop_reason: EOS unless a stop string was asked for.
    assert read_response(_response("stop"))["finish_reason"] == "eos"
    assert read_response(_response("stop"), stop_configured=True)["finish_reason"] == "stop"
    chat = {"choices": [{"message": {"content": "cba"}, "finish_reason": "stop"}], "usage": {}}
    assert read_response(chat) == {"text": "cba", "num_tokens": 0, "finish_reason": "eos"}
