"""``python -m basic_plugin.lab.train``: the host's training entry (``python -m basic_plugin.train``) with the
lab's plugins registered first (the DINOv2 tower), for the demo's runs. The same flags."""
from basic_plugin.host.train import main
from basic_plugin.lab.towers import register_lab_plugins

if __name__ == "__main__":
    register_lab_plugins()
    main()
