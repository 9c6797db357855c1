"""Configuration: the schema of the suite's yacs config (conf/defaults.py plus the nodes the caller declares), how
a YAML file and command-line ``KEY VALUE`` pairs merge into it, the one error family, declared options and the one
registry mechanism. This is the lowest layer: it imports nothing else of the suite. harness/build.py adds the
registered methods' keys and checks a config against the registries."""
from conf.compose import config_names
from conf.errors import ConfigError, UserError
from conf.options import Option
from conf.registry import PLUGIN_MODULES, Registry, import_plugins, plugin_module_name
from conf.loading import ConfigSource, load_config
from conf.schema import check_values, declared_options, defaults, inert_settings, read_yaml

__all__ = ["ConfigError", "ConfigSource", "config_names", "Option", "PLUGIN_MODULES", "Registry", "UserError",
           "check_values", "declared_options", "defaults", "import_plugins", "inert_settings", "load_config",
           "plugin_module_name", "read_yaml"]
