import pytest


@pytest.fixture(scope="session")
def style_corpus():
    from raydpo.tasks import style

    return style.corpus(seed=0, count=2000)
