"""changerelay: MongoDB change streams to browsers over WebSockets and SSE.

    pip install -r requirements.txt
    MONGO_SRV="mongodb://localhost:27017/?replicaSet=rs0" python server.py

``python server.py --help`` lists every setting. The work happens in the ``changerelay`` package.
"""

import sys

from changerelay.__main__ import main

if __name__ == "__main__":
    sys.exit(main(prog="server.py"))
