from tests.helpers import random_state_dict  # noqa: F401
