"""Built-in environments, by name.

``agentrl.envs.make_env(name, **kwargs)`` looks ``name`` up in :data:`ENVIRONMENTS` (values are
``module:Class`` paths) and builds the class with ``kwargs``. To use your own environment, either add an
entry here or pass an import path directly, e.g. ``make_env("my_pkg.envs:ShopEnv", level=2)``; the module
only has to be importable.
"""

ENVIRONMENTS: dict[str, str] = {
    "calculator": "environments.calculator:CalculatorEnv",
    "lookup": "environments.lookup:LookupEnv",
    "db": "environments.db:DBEnv",
    "kg": "environments.kg:KGEnv",
    "os": "environments.os_shell:OSEnv",
    "household": "environments.household:HouseholdEnv",
    "reasoning_gym": "environments.reasoning_gym_env:ReasoningGymEnv",
    "web": "environments.web:WebShopEnv",
}
