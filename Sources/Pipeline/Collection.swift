import Foundation
import Imaging
import Queue

/// Resolving a job's collection folder and walking it, confined to the configured roots.
public enum CollectionAccess {
    /// The real path (symlinks resolved) of `path`, or nil when it does not exist.
    public static func realPath(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }

    /// True when `path` (a real path) is one of `roots` (real paths) or lies below one.
    public static func isUnder(_ path: String, roots: [String]) -> Bool {
        roots.contains { root in
            path == root || path.hasPrefix(root.hasSuffix("/") ? root : root + "/")
        }
    }

    /// The roots as real paths (a root that does not exist is kept as written and matches nothing real).
    public static func resolveRoots(_ roots: [String]) -> [String] {
        roots.map { realPath($0) ?? $0 }
    }

    /// Checks a job's `collection`: it must exist, be a folder, and (symlinks resolved) lie under a root.
    /// The messages are the ones users see in nola.jobs.error.
    public static func resolve(_ collection: String, roots: [String]) throws -> URL {
        let resolvedRoots = resolveRoots(roots)
        if roots.isEmpty {
            throw JobError.badInput("collection folder \(collection) is outside the configured collection roots (none are configured)")
        }
        guard let real = realPath(collection) else {
            // Say "outside" rather than "missing" for paths the daemon may not look at.
            if !isUnder(URL(fileURLWithPath: collection).standardizedFileURL.path, roots: roots + resolvedRoots) {
                throw JobError.badInput("collection folder \(collection) is outside the configured collection roots (\(roots.joined(separator: ", ")))")
            }
            throw JobError.badInput("collection folder \(collection) does not exist")
        }
        guard isUnder(real, roots: resolvedRoots) else {
            let via = real == collection ? "" : " (it resolves to \(real))"
            throw JobError.badInput("collection folder \(collection) is outside the configured collection roots (\(roots.joined(separator: ", ")))\(via)")
        }
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: real, isDirectory: &isDir), isDir.boolValue else {
            throw JobError.badInput("collection \(collection) is not a folder")
        }
        guard access(real, R_OK | X_OK) == 0 else {
            throw JobError.badInput("collection folder \(collection) cannot be read by the daemon (permission denied)")
        }
        return URL(fileURLWithPath: real)
    }

    /// A file found in a collection.
    public struct Entry: Equatable, Sendable {
        /// Relative to the collection, '/'-separated: the name itself, or, when it is not valid UTF-8,
        /// its text form with each byte outside valid UTF-8 written as `\xNN` (`ImageFile.escaped`).
        public let relativePath: String
        /// The exact bytes of the relative path when they are not valid UTF-8; nil otherwise.
        public let relativeBytes: [UInt8]?
        /// The file itself (symlinks resolved), by its bytes.
        public let file: ImageFile

        /// The real path for messages (escaped when not valid UTF-8).
        public var realPath: String { file.displayPath }
    }

    /// What `walk` found: the files and the symlinks it did not follow.
    public struct Walk: Equatable, Sendable {
        public var files: [Entry] = []
        public var skippedOutsideRoots = 0
        /// The relative paths (text form) of the files whose path is not valid UTF-8.
        public var undecodableNames: [String] {
            files.filter { $0.relativeBytes != nil }.map(\.relativePath)
        }
    }

    /// Every regular file below `folder` (a real path), sorted by relative path. Symlinks are followed
    /// only when their target lies under `roots`; a folder reached twice (symlink loop) is walked once.
    /// Paths are handled as bytes (readdir, lstat, realpath on bytes), so a name that is not valid
    /// UTF-8, of a file or of a folder above it, is walked and found like any other.
    public static func walk(_ folder: URL, roots: [String]) -> Walk {
        var result = Walk()
        let rootBytes = roots.map { Array($0.utf8) }
        let top = Array(folder.path.utf8)
        var visited: Set<[UInt8]> = [top]
        var pending: [(real: [UInt8], relative: [UInt8])] = [(top, [])]
        while let (dir, prefix) = pending.popLast() {
            for name in directoryNames(dir) {
                let path = dir + [0x2F] + name
                let relative = prefix.isEmpty ? name : prefix + [0x2F] + name
                var st = stat()
                guard withCString(path, { lstat($0, &st) }) == 0 else { continue }
                var target = path
                if (st.st_mode & S_IFMT) == S_IFLNK {
                    guard let real = realPath(bytes: path), withCString(real, { stat($0, &st) }) == 0 else { continue }
                    guard isUnder(bytes: real, roots: rootBytes) else { result.skippedOutsideRoots += 1; continue }
                    target = real
                }
                switch st.st_mode & S_IFMT {
                case S_IFDIR:
                    let real = target == path ? (realPath(bytes: path) ?? path) : target
                    if visited.insert(real).inserted { pending.append((real, relative)) }
                case S_IFREG:
                    let text = String(validating: relative, as: UTF8.self)
                    result.files.append(Entry(relativePath: text ?? ImageFile.escaped(relative),
                                              relativeBytes: text == nil ? relative : nil,
                                              file: ImageFile(pathBytes: target)))
                default:
                    continue
                }
            }
        }
        result.files.sort { $0.relativePath < $1.relativePath }
        return result
    }

    private static func withCString<T>(_ bytes: [UInt8], _ body: (UnsafePointer<CChar>) -> T) -> T {
        (bytes.map { CChar(bitPattern: $0) } + [0]).withUnsafeBufferPointer { body($0.baseAddress!) }
    }

    /// `realpath` on bytes.
    public static func realPath(bytes: [UInt8]) -> [UInt8]? {
        guard let p = withCString(bytes, { realpath($0, nil) }) else { return nil }
        defer { free(p) }
        return Array(UnsafeBufferPointer(start: p, count: strlen(p)).map { UInt8(bitPattern: $0) })
    }

    /// `isUnder` on bytes.
    public static func isUnder(bytes path: [UInt8], roots: [[UInt8]]) -> Bool {
        roots.contains { root in
            let prefix = root.last == 0x2F ? root : root + [0x2F]
            return path == root || path.starts(with: prefix)
        }
    }

    /// The entries of a folder as raw bytes ("." and ".." left out); empty when it cannot be opened.
    static func directoryNames(_ path: [UInt8]) -> [[UInt8]] {
        guard let dir = withCString(path, { opendir($0) }) else { return [] }
        defer { closedir(dir) }
        var names: [[UInt8]] = []
        while let entry = readdir(dir) {
            let name: [UInt8] = withUnsafeBytes(of: entry.pointee.d_name) { Array($0.prefix { $0 != 0 }) }
            if name == [0x2E] || name == [0x2E, 0x2E] { continue }
            names.append(name)
        }
        return names
    }

    /// True for the file names of the formats nolad reads (.jpg, .jpeg, .png, any case).
    public static func hasImageExtension(_ name: String) -> Bool {
        let lower = name.lowercased()
        return lower.hasSuffix(".jpg") || lower.hasSuffix(".jpeg") || lower.hasSuffix(".png")
    }

    /// "jpeg" or "png" from the file's first bytes, or nil.
    public static func imageFormat(magic bytes: [UInt8]) -> String? {
        if bytes.count >= 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF { return "jpeg" }
        if bytes.count >= 8 && bytes[0..<8] == [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A][...] { return "png" }
        return nil
    }

    /// Reads a file once: its format from the magic bytes, its size and its SHA-256. Nil format for
    /// non-images (which are then not hashed further). A file named like an image (`imageByName`, e.g.
    /// a zero-byte or damaged `.jpg`) is an image whatever its bytes: it is hashed, its format taken
    /// from the name, and the decoder later records why it is unreadable. Throws when the file cannot be read.
    public static func inspect(_ path: String, imageByName: Bool = false) throws -> (format: String?, size: Int, sha256: String) {
        try inspect(ImageFile(path: path), imageByName: imageByName)
    }

    /// `inspect` for a file named by its bytes.
    public static func inspect(_ file: ImageFile, imageByName: Bool = false) throws -> (format: String?, size: Int, sha256: String) {
        let path = file.displayPath
        let fd = withCString(file.pathBytes) { open($0, O_RDONLY | O_CLOEXEC) }
        guard fd >= 0 else { throw JobError.transient("cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var hasher = SHA256()
        var size = 0
        var format: String?? = nil
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw JobError.transient("cannot read \(path): \(String(cString: strerror(errno)))")
            }
            if format == nil {
                var f = imageFormat(magic: Array(buffer[0..<min(n, 8)]))
                if f == nil && imageByName { f = path.lowercased().hasSuffix(".png") ? "png" : "jpeg" }
                format = .some(f)
                if f == nil { return (nil, n, "") }
            }
            if n == 0 { break }
            buffer.withUnsafeBytes { hasher.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            size += n
        }
        return (format ?? nil, size, SHA256.hex(hasher.finalize()))
    }
}

/// The first stage of every job: record each JPEG/PNG of the collection (recognised by its magic
/// bytes) in nola.images with size and SHA-256, reporting progress per file.
public struct DiscoverImagesStage: JobStage {
    public let name = "discover"
    /// Testing aid (config `image_delay_seconds`): pause per file so tests can act mid-job.
    public let delayPerImage: Double

    public init(delayPerImage: Double = 0) {
        self.delayPerImage = delayPerImage
    }

    public func run(_ context: JobContext) throws {
        let start = Date()
        let roots = context.roots.map(\.path)
        let walk = CollectionAccess.walk(context.collection, roots: roots)
        let (files, outsideRoots) = (walk.files, walk.skippedOutsideRoots)
        for name in walk.undecodableNames {
            context.logger.info("a collection file's name is not valid UTF-8; it is recorded under its escaped name, with its bytes in nola.images.path_bytes",
                                metadata: ["job": "\(context.jobID)", "file": "\(name)"])
        }
        // An escaped name could, in principle, equal another file's real name; paths must be unique.
        // (Compared as bytes: Swift's String equality would merge canonically equivalent names.)
        var seen = Set<[UInt8]>()
        for file in files where !seen.insert(Array(file.relativePath.utf8)).inserted {
            throw JobError.badInput("two files of the collection are both recorded as \(file.relativePath) (one of them has a name that is not valid UTF-8, written with \\xNN escapes); rename one of them")
        }
        try context.reportProgress(stage: name, done: 0, total: files.count)
        try context.write { try Results.clearImages($0, context.job) }
        var batch: [ImageRecord] = []
        var images = 0, bytes = 0, notImages = 0, unreadable = 0
        var unreadableFiles: [String] = []
        var lastFlush = Date()
        func flush() throws {
            guard !batch.isEmpty else { return }
            let records = batch
            try context.write { try Results.insertImages($0, context.job, records) }
            batch.removeAll(keepingCapacity: true)
            lastFlush = Date()
        }
        for (i, file) in files.enumerated() {
            try context.checkCancelled()
            if delayPerImage > 0 { Thread.sleep(forTimeInterval: delayPerImage) }
            do {
                let info = try CollectionAccess.inspect(file.file, imageByName: CollectionAccess.hasImageExtension(file.relativePath))
                if let format = info.format {
                    batch.append(ImageRecord(path: file.relativePath, sizeBytes: info.size, sha256: info.sha256, format: format,
                                             pathBytes: file.relativeBytes))
                    images += 1
                    bytes += info.size
                } else {
                    notImages += 1
                }
            } catch {
                unreadable += 1
                unreadableFiles.append(file.relativePath)
                context.logger.warning("cannot read a collection file", metadata: ["job": "\(context.jobID)", "file": "\(file.relativePath)", "error": "\(error)"])
            }
            if batch.count >= 500 || Date().timeIntervalSince(lastFlush) > 1 { try flush() }
            try context.reportProgress(stage: name, done: i + 1, total: files.count)
        }
        try flush()
        if images == 0 {
            throw JobError.badInput("collection folder \(context.collection.path) contains no JPEG or PNG images")
        }
        try context.recordEvent(stage: name, kind: "metrics", metrics: [
            "images": .number(Double(images)), "bytes": .number(Double(bytes)), "files": .number(Double(files.count)),
            "not_images": .number(Double(notImages)), "unreadable": .number(Double(unreadable)),
            "skipped_outside_roots": .number(Double(outsideRoots)),
            // Files that cannot be labelled at all, by name (first 100), so none goes missing unseen.
            "cannot_open": .array(unreadableFiles.prefix(100).map { .string($0) }),
            "names_not_utf8": .number(Double(walk.undecodableNames.count)),
            "names_not_utf8_escaped": .array(walk.undecodableNames.prefix(100).map { .string($0) }),
            "seconds": .number((Date().timeIntervalSince(start) * 1000).rounded() / 1000),
        ])
    }
}
