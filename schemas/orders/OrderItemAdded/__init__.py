"""``OrderItemAdded``: its ``v<N>.avsc`` files, and ``upcasters.py`` if a step needs one."""
