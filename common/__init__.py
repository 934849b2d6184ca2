"""fedlocale common: config, model, data, training and record keys shared by server and clients.

Imports neither ``server`` nor ``client``.
"""
