"""The fault harness behind tools/faults.py: a lab of real daemons joined by a user-space switch
(lab, switch, rules), the clients and their history (client, workload), the nemesis, the run
(runner) and the checker of the history (history)."""
