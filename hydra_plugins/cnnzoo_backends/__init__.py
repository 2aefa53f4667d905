"""A Hydra search-path plugin: every installed backend's ``conf/backend/<name>.yaml``.

Hydra imports the modules of the ``hydra_plugins`` namespace package and applies each
SearchPathPlugin it finds, so ``backend=<name>`` works for a backend installed as its own
package, with no ``hydra.searchpath=`` on the command line. Only the backends' declarations
(``cnnzoo.core.backend.BackendInfo``) are read: no framework is imported."""
from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class BackendConfigs(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from cnnzoo.core.backend import available_backends, backend_info

        for name in available_backends():
            conf = backend_info(name).conf
            if conf is not None:
                search_path.append(provider=f"cnnzoo-backend-{name}", path=f"pkg://{conf}")
