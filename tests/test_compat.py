import pytest

from vispec_vllm.compat import UnsupportedVLLMVersion, check_vllm_version, is_supported


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.3", "0.32.1rc1"])
def test_supported_versions(version):
    assert is_supported(version)
    assert check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.32.0", "0.3.2"])
def test_other_versions_fail_with_both_versions_named(version):
    with pytest.raises(UnsupportedVLLMVersion) as err:
        check_vllm_version(version)
    message = str(err.value)
    assert version in message and "0.32.x" in message


def test_missing_vllm_is_an_error_only_when_required(monkeypatch):
    import vispec_vllm.compat as compat

    monkeypatch.setattr(compat, "installed_vllm_version", lambda: None)
    assert compat.check_vllm_version() is None
    with pytest.raises(UnsupportedVLLMVersion, match="no vLLM is installed"):
        compat.check_vllm_version(required=True)


def test_installed_vllm_is_supported():
    from vispec_vllm.compat import installed_vllm_version

    found = installed_vllm_version()
    assert found is not None and is_supported(found)
