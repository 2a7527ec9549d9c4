// The subset of the zip format that `torch.save` writes: stored (uncompressed) entries, found through
// the central directory, with ZIP64 records when the archive or an entry is past 4 GiB.
// Layout (APPNOTE.TXT): [local header + name + extra + data]* [central directory] [zip64 EOCD + locator]? [EOCD]

/// One stored entry of a zip archive: its data lies at `dataRange` in the file.
struct ZipEntry {
    let name: String
    /// 0 = stored; anything else is a compression torch never uses.
    let method: UInt16
    let dataRange: Range<Int>
}

/// Reads the central directory of a memory-mapped zip file. Compressed entries are listed but
/// rejected when read; everything torch writes is stored.
struct ZipArchive {
    let file: MappedFile
    /// Entries by name.
    let entries: [String: ZipEntry]
    /// Names in central-directory order.
    let names: [String]

    init(file: MappedFile) throws {
        self.file = file
        let path = file.path
        func bad(_ reason: String) -> CheckpointError { .unreadable(file: path, reason: reason) }
        let size = file.count

        // End of central directory: 22 bytes + comment (≤ 65535), searched backwards from the end.
        guard size >= 22 else { throw bad("not a zip archive (\(size) bytes)") }
        var eocd = -1
        var position = size - 22
        let lowest = max(0, size - 22 - 65535)
        while position >= lowest {
            if file.loadLE(UInt32.self, at: position) == 0x0605_4b50 { eocd = position; break }
            position -= 1
        }
        guard eocd >= 0 else {
            throw bad("not a zip archive (no end of central directory record; the legacy non-zip torch.save format is not supported)")
        }
        var entryCount = Int(file.loadLE(UInt16.self, at: eocd + 10))
        var directorySize = Int(file.loadLE(UInt32.self, at: eocd + 12))
        var directoryOffset = Int(file.loadLE(UInt32.self, at: eocd + 16))

        // ZIP64: a locator right before the EOCD points at the zip64 end record.
        if eocd >= 20, file.loadLE(UInt32.self, at: eocd - 20) == 0x0706_4b50 {
            let record64 = file.loadLE(UInt64.self, at: eocd - 20 + 8)
            guard size >= 56, record64 <= UInt64(size - 56), file.loadLE(UInt32.self, at: Int(record64)) == 0x0606_4b50 else {
                throw bad("bad ZIP64 end of central directory locator")
            }
            let r = Int(record64)
            let count64 = file.loadLE(UInt64.self, at: r + 32)
            let size64 = file.loadLE(UInt64.self, at: r + 40)
            let offset64 = file.loadLE(UInt64.self, at: r + 48)
            guard count64 < 1 << 32, size64 <= UInt64(size), offset64 <= UInt64(size) else {
                throw bad("bad ZIP64 end of central directory record")
            }
            entryCount = Int(count64)
            directorySize = Int(size64)
            directoryOffset = Int(offset64)
        }
        guard directoryOffset + directorySize <= size else {
            throw bad("central directory [\(directoryOffset), +\(directorySize)) runs past the end of the file (\(size) bytes; truncated?)")
        }

        var entries: [String: ZipEntry] = [:]
        var names: [String] = []
        var p = directoryOffset
        let directoryEnd = directoryOffset + directorySize
        for index in 0..<entryCount {
            guard p + 46 <= directoryEnd, file.loadLE(UInt32.self, at: p) == 0x0201_4b50 else {
                throw bad("central directory entry \(index) is corrupt")
            }
            let flags = file.loadLE(UInt16.self, at: p + 8)
            let method = file.loadLE(UInt16.self, at: p + 10)
            var compressedSize = UInt64(file.loadLE(UInt32.self, at: p + 20))
            var uncompressedSize = UInt64(file.loadLE(UInt32.self, at: p + 24))
            let nameLength = Int(file.loadLE(UInt16.self, at: p + 28))
            let extraLength = Int(file.loadLE(UInt16.self, at: p + 30))
            let commentLength = Int(file.loadLE(UInt16.self, at: p + 32))
            var localOffset = UInt64(file.loadLE(UInt32.self, at: p + 42))
            let next = p + 46 + nameLength + extraLength + commentLength
            guard next <= directoryEnd else { throw bad("central directory entry \(index) is corrupt") }
            let name = String(decoding: file.bytes(p + 46 ..< p + 46 + nameLength), as: UTF8.self)

            // ZIP64 extended information (id 1): the 8-byte values of the fields saturated at 0xFFFFFFFF, in order.
            var e = p + 46 + nameLength
            let extraEnd = e + extraLength
            while e + 4 <= extraEnd {
                let id = file.loadLE(UInt16.self, at: e)
                let length = Int(file.loadLE(UInt16.self, at: e + 2))
                guard e + 4 + length <= extraEnd else { throw bad("entry '\(name)' has a corrupt extra field") }
                if id == 1 {
                    var q = e + 4
                    func next64() throws -> UInt64 {
                        guard q + 8 <= e + 4 + length else { throw bad("entry '\(name)' has a short ZIP64 extra field") }
                        defer { q += 8 }
                        return file.loadLE(UInt64.self, at: q)
                    }
                    if uncompressedSize == 0xFFFF_FFFF { uncompressedSize = try next64() }
                    if compressedSize == 0xFFFF_FFFF { compressedSize = try next64() }
                    if localOffset == 0xFFFF_FFFF { localOffset = try next64() }
                }
                e += 4 + length
            }

            guard size >= 30, localOffset <= UInt64(size - 30), file.loadLE(UInt32.self, at: Int(localOffset)) == 0x0403_4b50 else {
                throw bad("entry '\(name)' has no local header at offset \(localOffset)")
            }
            let local = Int(localOffset)
            let localNameLength = Int(file.loadLE(UInt16.self, at: local + 26))
            let localExtraLength = Int(file.loadLE(UInt16.self, at: local + 28))
            let dataStart = local + 30 + localNameLength + localExtraLength
            guard flags & 1 == 0 else { throw bad("entry '\(name)' is encrypted") }
            guard method != 0 || compressedSize == uncompressedSize else {
                throw bad("stored entry '\(name)' has different compressed and uncompressed sizes")
            }
            guard compressedSize <= UInt64(size), dataStart + Int(compressedSize) <= size else {
                throw bad("entry '\(name)' (\(compressedSize) bytes at \(dataStart)) runs past the end of the file (\(size) bytes; truncated?)")
            }
            entries[name] = ZipEntry(name: name, method: method, dataRange: dataStart ..< dataStart + Int(compressedSize))
            names.append(name)
            p = next
        }
        self.entries = entries
        self.names = names
    }

    /// The stored bytes of `name`; throws when absent or compressed.
    func data(_ name: String) throws -> UnsafeRawBufferPointer {
        guard let entry = entries[name] else { throw CheckpointError.unreadable(file: file.path, reason: "archive has no entry '\(name)'") }
        guard entry.method == 0 else {
            throw CheckpointError.unreadable(file: file.path,
                                             reason: "entry '\(name)' is compressed (method \(entry.method)); only stored entries are supported")
        }
        return file.bytes(entry.dataRange)
    }
}
