"""The named texts: the other-domain evaluation text is real, long enough and not the Wikipedia sample."""

from compress import data


def test_pydoc_text_is_pythons_documentation_and_long_enough_to_evaluate():
    text = data.load_text("pydoc", "evaluation")
    assert text == data.pydoc_text() and len(text) > 200_000
    assert "The assert statement" in text or "Assert statements" in text
    wiki = data.default_text("evaluation")
    assert text[:2000] not in wiki
    # 32 windows of 512 tokens (the default evaluation) need about 16 K tokens; at a few
    # characters per token there are several times that.
    assert len(text) > 4 * 32 * 512
