from bgm.server import serve
from services.emotion.servicer import build


def main() -> None:
    serve("emotion", build)


if __name__ == "__main__":
    main()
