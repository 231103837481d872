"""The local swarm: a whole subnet on one machine, its process groups, the network lab, the cheating miners."""
