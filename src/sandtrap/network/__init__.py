"""The capture gateway (``network.mode: capture``): a box's only peer, answering DNS, HTTP and any TCP as the
internet would, recording it all, routing nothing out. See :mod:`sandtrap.network.gateway`."""
