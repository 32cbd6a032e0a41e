import lmsmith


def test_every_public_name_resolves():
    for name in lmsmith.__all__:
        assert callable(getattr(lmsmith, name)), name


def test_unknown_attribute_is_an_attribute_error():
    try:
        lmsmith.nope
    except AttributeError as e:
        assert "nope" in str(e)
    else:
        raise AssertionError("expected AttributeError")
