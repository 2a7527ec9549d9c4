// QueueTests — fixtures, if any, live next to this file and are found through #filePath.
