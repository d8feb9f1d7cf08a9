"""Guest messages are bounded by their announced length and their nesting before they are decoded."""

from __future__ import annotations

import pytest

from tenantflow.plugins.sandboxing import guestmsg


def test_message_limits_are_checked_by_length_and_depth() -> None:
    assert guestmsg.too_large(1114112, 1114112) is None
    error = guestmsg.too_large(1114113, 1114112)
    assert error is not None and "1 MiB of step output plus 64 KiB" in str(error)
    assert guestmsg.decode(b'{"op": "x", "v": [[1]]}') == {"op": "x", "v": [[1]]}
    deep = "[" * 300 + "]" * 300
    with pytest.raises(guestmsg.MessageError, match="nested 301 deep"):
        guestmsg.decode('{"v": ' + deep + "}")
    assert guestmsg.decode('{"v": "' + "[" * 5000 + '"}')  # brackets in strings do not nest
    with pytest.raises(guestmsg.MessageError, match="not a JSON object"):
        guestmsg.decode(b"[1]")
