// `nolad export` on a real labelling job (the pipeline fixtures' tiny CLIP and DINO): the class-folder
// tree with each link type, the Label Studio tasks and config, the FiftyOne dataset, and the failures
// (docs/exports.md). Reading the exports back with torchvision, label-studio-sdk and fiftyone is
// reference/check_exports.py, outside CI.
import Foundation
import Queue
import XCTest

final class ExportCommandTests: DatabaseTestCase {
    /// Class names that are not safe folder names as they are.
    static let classes = ["red/ball", "green leaf", ".blue sky"]
    static let folders = ["red/ball": "red_ball", "green leaf": "green leaf", ".blue sky": "_blue sky"]
    static let latin1Name: [UInt8] = Array("blue_sky/caf".utf8) + [0xE9] + Array(".jpg".utf8)

    var exe = ""
    var collection = ""

    /// The fixture collection plus a zero-byte (unreadable) JPEG and a JPEG whose name is Latin-1.
    func makeJobCollection() throws {
        collection = root + "/shapes"
        try FileManager.default.copyItem(atPath: pipelineFixtures.appendingPathComponent("collection").path, toPath: collection)
        XCTAssertTrue(FileManager.default.createFile(atPath: collection + "/green_leaf/empty.jpg", contents: Data()))
        let sky = try Data(contentsOf: URL(fileURLWithPath: collection + "/blue_sky/00.jpg")) + Data([0])
        let fd = (Array(collection.utf8) + [UInt8(ascii: "/")] + Self.latin1Name + [0]).withUnsafeBufferPointer {
            $0.withMemoryRebound(to: CChar.self) { open($0.baseAddress!, O_CREAT | O_WRONLY, 0o644) }
        }
        XCTAssertGreaterThanOrEqual(fd, 0)
        XCTAssertEqual(sky.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }, sky.count)
        close(fd)
    }

    func runJob() throws -> Int64 {
        _ = try startDaemon("export", settings: ["pipeline": "nola", "model_root": pipelineFixtures.appendingPathComponent("models").path,
                                                 "clip_model": "tiny-clip", "dino_model": "tiny-dino", "threads": "2"])
        let rows = try db.query("""
            INSERT INTO nola.jobs (collection, classes, parameters) VALUES ($1, $2, $3::jsonb) RETURNING id
            """, [collection, Self.classes, #"{"prompt_epochs": 2, "prompt_batch_size": 8, "alignment_epochs": 3, "min_k": 2, "seed": 5}"#])
        let id = Int64(try rows[0].int("id"))
        try waitSucceeded(id, timeout: 180)
        return id
    }

    func export(_ args: [String]) throws -> (Int32, String) {
        try runProgram(exe, ["export"] + args + ["--database", conninfo])
    }

    /// (path, label, confidence) of the job's labelled images, and the paths of its unreadable ones.
    func labels(_ id: Int64) throws -> (labelled: [String: (label: String, confidence: Double)], unreadable: [String]) {
        let rows = try db.query("SELECT path, label, confidence, unreadable FROM nola.labels WHERE job_id = $1", [id])
        var labelled: [String: (String, Double)] = [:], unreadable: [String] = []
        for r in rows.rows {
            if let label = try r.optionalString("label") { labelled[try r.string("path")] = (label, try r.double("confidence")) }
            else { unreadable.append(try r.string("path")) }
        }
        return (labelled, unreadable)
    }

    func readLink(_ path: String) -> [UInt8]? {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink(path, &buffer, buffer.count)
        return n < 0 ? nil : buffer[..<n].map { UInt8(bitPattern: $0) }
    }

    func fileStat(_ path: [UInt8]) -> stat? {
        var st = stat()
        let rc = (path + [0]).withUnsafeBufferPointer { $0.withMemoryRebound(to: CChar.self) { stat($0.baseAddress!, &st) } }
        return rc == 0 ? st : nil
    }

    /// The source bytes of an image by its `path` text (the Latin-1 one by its escaped name).
    func sourceBytes(_ path: String) -> [UInt8] {
        Array((collection + "/").utf8) + (path == "blue_sky/caf\\xE9.jpg" ? Self.latin1Name : Array(path.utf8))
    }

    /// Every file of a tree, relative to it.
    func files(_ folder: String) -> [String] {
        (FileManager.default.enumerator(atPath: folder)?.allObjects as? [String] ?? []).filter {
            var isDir: ObjCBool = false
            return FileManager.default.fileExists(atPath: folder + "/" + $0, isDirectory: &isDir) && !isDir.boolValue
        }.sorted()
    }

    func testExports_ofARealJob_writeTheLayoutsTheirToolsRead_andRefuseWhatTheyCannotDo() throws {
        exe = try noladExecutable()
        try makeJobCollection()
        let id = try runJob()
        let (labelled, unreadable) = try labels(id)
        XCTAssertEqual(labelled.count, 19, "18 fixture images and the Latin-1 copy")
        XCTAssertEqual(unreadable.sorted(), ["green_leaf/empty.jpg", "red_ball/bad.jpg"])

        // imagefolder, symlinks (the default): <class folder>/<sub-path with '/' as '__'>, each a link to the source.
        let tree = root + "/tree"
        var (status, out) = try export([String(id), "--format", "imagefolder", "--output", tree])
        XCTAssertEqual(status, 0, out)
        XCTAssertTrue(out.contains("wrote 19 images (symlink)"), out)
        XCTAssertTrue(out.contains("2 unreadable images were left out"), out)
        let expected = labelled.map { path, l in Self.folders[l.label]! + "/" + path.replacingOccurrences(of: "/", with: "__") }.sorted()
        XCTAssertEqual(files(tree).filter { $0 != ".nolad-export" }, expected)
        XCTAssertTrue(Set(try FileManager.default.contentsOfDirectory(atPath: tree)).isSubset(of: Set(Self.folders.values).union([".nolad-export"])))
        for (path, l) in labelled {
            let link = tree + "/" + Self.folders[l.label]! + "/" + path.replacingOccurrences(of: "/", with: "__")
            XCTAssertEqual(readLink(link), sourceBytes(path), "\(link) links to the exact source file")
        }

        // An existing export is replaced only with --force; a folder nolad did not write, never.
        (status, out) = try export([String(id), "--format", "imagefolder", "--output", tree, "--link", "hardlink"])
        XCTAssertEqual(status, 1)
        XCTAssertTrue(out.contains("already holds an export; pass --force"), out)
        XCTAssertNotNil(readLink(tree + "/" + expected[0]), "the earlier export is untouched")
        (status, out) = try export([String(id), "--format", "imagefolder", "--output", tree, "--link", "hardlink", "--force"])
        XCTAssertEqual(status, 0, out)
        for (path, l) in labelled {
            let file = Array((tree + "/" + Self.folders[l.label]! + "/" + path.replacingOccurrences(of: "/", with: "__")).utf8)
            XCTAssertNil(readLink(String(decoding: file, as: UTF8.self)), "a hard link, not a symlink")
            let (a, b) = (try XCTUnwrap(fileStat(file)), try XCTUnwrap(fileStat(sourceBytes(path))))
            XCTAssertEqual(a.st_ino, b.st_ino, "\(path): the same inode")
        }
        let mine = root + "/mine"
        try FileManager.default.createDirectory(atPath: mine, withIntermediateDirectories: true)
        XCTAssertTrue(FileManager.default.createFile(atPath: mine + "/keep.txt", contents: Data("mine".utf8)))
        (status, out) = try export([String(id), "--format", "imagefolder", "--output", mine, "--force"])
        XCTAssertEqual(status, 1)
        XCTAssertTrue(out.contains("was not written by nolad export"), out)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mine), ["keep.txt"])

        // Copies: regular files with the source's bytes.
        let copies = root + "/copies"
        (status, out) = try export([String(id), "--format", "imagefolder", "--output", copies, "--link", "copy"])
        XCTAssertEqual(status, 0, out)
        for (path, l) in labelled {
            let file = copies + "/" + Self.folders[l.label]! + "/" + path.replacingOccurrences(of: "/", with: "__")
            XCTAssertNil(readLink(file))
            let st = try XCTUnwrap(fileStat(Array(file.utf8)))
            XCTAssertEqual(st.st_nlink, 1, "a copy, not a link")
            let source = path == "blue_sky/caf\\xE9.jpg" ? try Data(contentsOf: URL(fileURLWithPath: collection + "/blue_sky/00.jpg")) + Data([0])
                                                        : try Data(contentsOf: URL(fileURLWithPath: collection + "/" + path))
            XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: file)), source, path)
        }

        // Label Studio: tasks with data.image and a choices prediction, and a config whose Choices are the classes.
        let tasksPath = root + "/tasks.json"
        (status, out) = try export([String(id), "--format", "labelstudio", "--output", tasksPath])
        XCTAssertEqual(status, 0, out)
        let config = try String(contentsOfFile: root + "/tasks.label_config.xml", encoding: .utf8)
        XCTAssertTrue(config.contains(#"<Image name="image" value="$image"/>"#), config)
        XCTAssertTrue(config.contains(#"<Choices name="label" toName="image" choice="single""#), config)
        let choices = config.components(separatedBy: "<Choice value=\"").dropFirst().map { String($0.prefix { $0 != "\"" }) }
        XCTAssertEqual(choices, Self.classes, "the job's classes, in order")
        let tasks = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: tasksPath))) as? [[String: Any]])
        XCTAssertEqual(tasks.count, 19)
        for task in tasks {
            let data = try XCTUnwrap(task["data"] as? [String: Any])
            let path = try XCTUnwrap(data["path"] as? String)
            let image = try XCTUnwrap(data["image"] as? String)
            XCTAssertEqual(image, path == "blue_sky/caf\\xE9.jpg" ? "file://" + collection + "/blue_sky/caf%E9.jpg" : collection + "/" + path)
            let predictions = try XCTUnwrap(task["predictions"] as? [[String: Any]])
            XCTAssertEqual(predictions.count, 1)
            XCTAssertEqual(predictions[0]["model_version"] as? String, "nolad job \(id)")
            XCTAssertEqual(try XCTUnwrap(predictions[0]["score"] as? Double), labelled[path]!.confidence, accuracy: 1e-6)
            let result = try XCTUnwrap(predictions[0]["result"] as? [[String: Any]])
            XCTAssertEqual(result.count, 1)
            XCTAssertEqual(result[0]["type"] as? String, "choices")
            XCTAssertEqual(result[0]["from_name"] as? String, "label")
            XCTAssertEqual(result[0]["to_name"] as? String, "image")
            XCTAssertEqual((result[0]["value"] as? [String: Any])?["choices"] as? [String], [labelled[path]!.label])
        }
        (status, out) = try export([String(id), "--format", "labelstudio", "--output", tasksPath, "--url-prefix", "/data/local-files/?d=shapes/"])
        XCTAssertEqual(status, 1)
        XCTAssertTrue(out.contains("already exists; pass --force"), out)
        (status, out) = try export([String(id), "--format", "labelstudio", "--output", tasksPath, "--url-prefix", "/data/local-files/?d=shapes/", "--force"])
        XCTAssertEqual(status, 0, out)
        let prefixed = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: tasksPath))) as? [[String: Any]])
        let urls = prefixed.compactMap { ($0["data"] as? [String: Any])?["image"] as? String }
        XCTAssertTrue(urls.contains("/data/local-files/?d=shapes/blue_sky/caf%E9.jpg"), "\(urls)")
        XCTAssertTrue(urls.contains("/data/local-files/?d=shapes/red_ball/00.jpg"), "\(urls)")

        // FiftyOne: data/ with the images, labels.json with the classes and {label index, confidence} per file stem.
        let fiftyone = root + "/fo"
        (status, out) = try export([String(id), "--format", "fiftyone", "--output", fiftyone])
        XCTAssertEqual(status, 0, out)
        XCTAssertEqual(Set(try FileManager.default.contentsOfDirectory(atPath: fiftyone)), ["data", "labels.json", ".nolad-export"])
        let dataFiles = try FileManager.default.contentsOfDirectory(atPath: fiftyone + "/data").sorted()
        func fiftyOneName(_ path: String) -> String { path.replacingOccurrences(of: "/", with: "__").replacingOccurrences(of: "\\", with: "_") }
        XCTAssertEqual(dataFiles, labelled.keys.map(fiftyOneName).sorted())
        let document = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: fiftyone + "/labels.json"))) as? [String: Any])
        XCTAssertEqual(document["classes"] as? [String], Self.classes)
        let fiftyLabels = try XCTUnwrap(document["labels"] as? [String: [String: Any]])
        XCTAssertEqual(fiftyLabels.count, 19)
        for (path, l) in labelled {
            let stem = (fiftyOneName(path) as NSString).deletingPathExtension
            let target = try XCTUnwrap(fiftyLabels[stem], stem)
            XCTAssertEqual(target["label"] as? Int, Self.classes.firstIndex(of: l.label))
            XCTAssertEqual(try XCTUnwrap(target["confidence"] as? Double), l.confidence, accuracy: 1e-6)
            XCTAssertEqual(readLink(fiftyone + "/data/" + stem + "." + (path as NSString).pathExtension), sourceBytes(path))
        }

        // Failures: a sentence, status 1, and nothing left at the output's name or beside it.
        let failed = try db.query("INSERT INTO nola.jobs (collection, classes) VALUES ($1, '{a,b}') RETURNING id", [root + "/missing"])
        let failedID = Int64(try failed[0].int("id"))
        _ = try waitState(failedID, ["failed"], timeout: 60)
        let nowhere = root + "/nowhere"
        for (args, message) in [
            (["999999", "--format", "imagefolder"], "no job 999999"),
            ([String(failedID), "--format", "fiftyone"], "job \(failedID) failed; only a succeeded job can be exported"),
            ([String(id), "--format", "imagefolder", "--link", "soft"], "--link must be symlink, hardlink or copy"),
            ([String(id), "--format", "imagefolder", "--output", collection + "/export"], "is inside the job's collection"),
            ([String(id), "--format", "fiftyone", "--output", root + "/no/such/folder"], "that would hold"),
        ] {
            (status, out) = try export(args + (args.contains("--output") ? [] : ["--output", nowhere]))
            XCTAssertEqual(status, 1, "\(args): \(out)")
            XCTAssertTrue(out.hasPrefix("nolad: ") && out.contains(message), "\(args): \(out)")
        }
        try FileManager.default.moveItem(atPath: collection + "/red_ball/01.jpg", toPath: root + "/01.jpg")
        (status, out) = try export([String(id), "--format", "imagefolder", "--output", nowhere])
        XCTAssertEqual(status, 1)
        XCTAssertTrue(out.contains("\(collection)/red_ball/01.jpg of job \(id) is missing from its collection"), out)
        try FileManager.default.moveItem(atPath: root + "/01.jpg", toPath: collection + "/red_ball/01.jpg")
        try FileManager.default.moveItem(atPath: collection, toPath: root + "/moved")
        (status, out) = try export([String(id), "--format", "labelstudio", "--output", nowhere + ".json"])
        XCTAssertEqual(status, 1)
        XCTAssertTrue(out.contains("the collection folder \(collection) of job \(id) no longer exists"), out)
        XCTAssertFalse(try FileManager.default.contentsOfDirectory(atPath: root).contains { $0.hasPrefix("nowhere") || $0.contains(".nolad-") },
                       "no output and no temporary left behind")
    }
}
