"""Tollway's built-in plugins.

Each uses only the public hooks of ``proxy.hookspecs`` (a third-party plugin has the same), is
named in ``chain:`` and owns a strict config model. A small plugin is one module (``auth``,
``privacy``, ``routing``); a plugin with helpers is a package (``batching``, ``cache``,
``limits``, ``metering``) whose ``plugin`` module holds the hooks. A plugin imports the core
(``proxy.*``) and its own package, never another plugin.
"""
